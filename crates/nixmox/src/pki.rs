//! The project CA and the trust of NixMox's own HTTPS clients (issue 12, item 6).
//!
//! One CA per project signs the certificates the reverse proxy serves (Caddy's `pki` app with
//! this root; Caddy makes its intermediate and the sites' certificates). Its key is a generated
//! secret of the proxy's host (`pki/ca_key`, in that host's SOPS file only); its certificate is
//! public, `secrets/ca.crt` in the project, and every host trusts it
//! (`security.pki.certificateFiles`).
//!
//! NixMox's own clients trust one set: the system's roots, the project CA,
//! `proxmox.tls.ca_file` and `NIXMOX_CA_FILE` (or `.nixmox/ca.pem`). Terraform's providers (Go)
//! get it as one PEM bundle named by `SSL_CERT_FILE`; health checks and verification load the
//! same files into rustls, on top of webpki's copy of the public roots.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nixmox_core::render::nixos::PROJECT_CA_CERT;
use nixmox_core::Project;

/// The bundle Terraform's providers trust, under `.nixmox/`.
pub const BUNDLE_NAME: &str = "ca-bundle.pem";

/// Where the system's roots are looked for, first found wins (Debian/Ubuntu/NixOS, Fedora/RHEL,
/// Alpine/macOS), unless `SSL_CERT_FILE` is set for NixMox itself.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// A new CA: its certificate and private key, both PEM. The key is a secret: it goes only into
/// the proxy host's SOPS file and the run's redactions.
pub struct NewCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a new project CA: an ECDSA P-256 key and a self-signed root valid for ten years,
/// named after the project's domain.
pub fn generate(domain: &str) -> Result<NewCa, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot make the project CA's key: {e}"))?;
    let cert_pem = certificate(&key, domain)?;
    Ok(NewCa {
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

/// A root certificate for a CA key that exists (its certificate was lost): same key, so what
/// it signed stays valid.
pub fn certificate_for_key(key_pem: &str, domain: &str) -> Result<String, String> {
    // The parser's error never quotes the key.
    let key = rcgen::KeyPair::from_pem(key_pem)
        .map_err(|e| format!("the project CA's key (`pki/ca_key`) is not a usable key: {e}"))?;
    certificate(&key, domain)
}

fn certificate(key: &rcgen::KeyPair, domain: &str) -> Result<String, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(DnType::CommonName, format!("NixMox project CA ({domain})"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "NixMox");
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let cert = params
        .self_signed(key)
        .map_err(|e| format!("cannot sign the project CA's certificate: {e}"))?;
    Ok(cert.pem())
}

/// The current year (UTC), near enough for a validity window with a year of slack each side.
fn this_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

/// The project CA's certificate in the project.
pub fn ca_cert_path(root: &Path) -> PathBuf {
    root.join(PROJECT_CA_CERT)
}

/// The CA files NixMox's clients trust besides the public roots, in order: the project CA's
/// certificate (when it exists), `proxmox.tls.ca_file`, and `NIXMOX_CA_FILE` (else
/// `.nixmox/ca.pem` when it exists).
pub fn trust_files(root: &Path, project: &Project) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let ca = ca_cert_path(root);
    if ca.is_file() {
        out.push(ca);
    }
    if let Some(f) = &project.proxmox.tls.ca_file {
        // A relative path is relative to the project root (`join` keeps an absolute one). A
        // missing file is the Proxmox driver's error to report, with its own words; here it
        // would only stop every health check and Terraform step.
        let path = root.join(f);
        if path.is_file() {
            out.push(path);
        }
    }
    match std::env::var_os(crate::health::ENV_CA_FILE).filter(|v| !v.is_empty()) {
        Some(p) => out.push(PathBuf::from(p)),
        None => {
            let default = root.join(".nixmox/ca.pem");
            if default.is_file() {
                out.push(default);
            }
        }
    }
    out
}

/// The system's roots: the file `SSL_CERT_FILE` names for NixMox itself, else the first of the
/// usual places that exists.
pub fn system_roots() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    SYSTEM_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The bundle's text: the system's roots, then each of `files` (each must hold at least one PEM
/// certificate).
pub fn bundle_text(system: Option<&Path>, files: &[PathBuf]) -> Result<String, String> {
    let mut out = String::new();
    if let Some(s) = system {
        let text = std::fs::read_to_string(s)
            .map_err(|e| format!("the system's roots `{}`: {e}", s.display()))?;
        push_block(&mut out, &text);
    }
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("the CA file `{}`: {e}", f.display()))?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "the CA file `{}`: no PEM certificate in it",
                f.display()
            ));
        }
        push_block(&mut out, &text);
    }
    Ok(out)
}

fn push_block(out: &mut String, text: &str) {
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
}

/// Writes the bundle Terraform's providers trust to `dot/ca-bundle.pem` (when its content
/// changed) and returns its absolute path, for `SSL_CERT_FILE`.
pub fn write_bundle(
    dot: &Path,
    system: Option<&Path>,
    files: &[PathBuf],
) -> Result<PathBuf, String> {
    // Terraform steps run in parallel threads, and `write_atomic`'s temporary name is per
    // process: one writer at a time.
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    let text = bundle_text(system, files)?;
    let path = std::path::absolute(dot.join(BUNDLE_NAME))
        .map_err(|e| format!("cannot make `{}` absolute: {e}", dot.display()))?;
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        crate::project_fs::write_atomic(&path, text.as_bytes())
            .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
    }
    Ok(path)
}

/// `SSL_CERT_FILE` for a Terraform process of the project at `root`: the bundle of its trust
/// set, written to `.nixmox/ca-bundle.pem`. Made again for every process, because the project
/// CA can appear during a run.
pub fn terraform_env(
    root: &Path,
    project: &Project,
) -> Result<(std::ffi::OsString, std::ffi::OsString), String> {
    let files = trust_files(root, project);
    let bundle = write_bundle(&root.join(".nixmox"), system_roots().as_deref(), &files)?;
    Ok(("SSL_CERT_FILE".into(), bundle.into_os_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_ca_is_a_p256_root_and_its_certificate_can_be_remade_from_its_key() {
        let ca = generate("lab.lan").unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!ca.cert_pem.contains("PRIVATE KEY"));
        let again = certificate_for_key(&ca.key_pem, "lab.lan").unwrap();
        let der = |pem: &str| {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        // Both are usable trust anchors for rustls.
        for pem in [&ca.cert_pem, &again] {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der(pem)).unwrap();
        }
    }

    #[test]
    fn a_bad_key_is_reported_without_its_text() {
        let e = certificate_for_key("not a key SECRETVALUE", "lab.lan").unwrap_err();
        assert!(!e.contains("SECRETVALUE"), "{e}");
    }

    #[test]
    fn the_bundle_holds_the_system_roots_then_each_file_and_refuses_a_file_without_certificates() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys.pem");
        std::fs::write(
            &sys,
            "-----BEGIN CERTIFICATE-----\nSYS\n-----END CERTIFICATE-----",
        )
        .unwrap();
        let ca = t.path().join("ca.crt");
        std::fs::write(&ca, generate("lab.lan").unwrap().cert_pem).unwrap();
        let path = write_bundle(
            &t.path().join(".nixmox"),
            Some(&sys),
            std::slice::from_ref(&ca),
        )
        .unwrap();
        assert!(path.is_absolute());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\nSYS\n-----END CERTIFICATE-----\n"));
        assert!(text.ends_with(&std::fs::read_to_string(&ca).unwrap()));
        let empty = t.path().join("empty.pem");
        std::fs::write(&empty, "nothing").unwrap();
        let e = bundle_text(None, &[empty]).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
