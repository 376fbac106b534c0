//! TLS for the PVE API: verified against webpki's roots plus `proxmox.tls.ca_file` by default;
//! a SHA-256 pin of the server's certificate (`proxmox.tls.fingerprint`) for self-signed
//! clusters; no verification at all only with `proxmox.tls.insecure: true`.
//!
//! The verifier remembers the fingerprint of the last certificate it refused, so the error can
//! tell the operator exactly what to pin (after checking it out of band).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use super::error::PveError;

/// How the server's certificate is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file of extra trusted CAs (PVE's `pve-root-ca.pem`, say).
    pub ca_file: Option<std::path::PathBuf>,
    /// SHA-256 of the server's certificate, 32 bytes.
    pub fingerprint: Option<[u8; 32]>,
    /// Accept any certificate. Only ever set from `proxmox.tls.insecure: true`.
    pub insecure: bool,
}

impl TlsSettings {
    /// The warning to show on every run that talks to PVE with these settings, if any.
    pub fn warning(&self) -> Option<String> {
        self.insecure.then(|| {
            "TLS certificate verification of the Proxmox API is OFF (proxmox.tls.insecure: true): \
             anyone on the path can read the API token; pin the certificate with \
             proxmox.tls.fingerprint instead"
                .to_string()
        })
    }
}

/// Parses a SHA-256 fingerprint: 64 hex digits, optionally separated by `:` (as PVE shows it).
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text
        .trim()
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `AB:CD:…`, the way PVE's GUI and `pvenode cert info` show fingerprints.
pub fn format_fingerprint(fp: &[u8]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why the last certificate was refused, for the error message.
#[derive(Clone, Debug, Default)]
pub struct Rejection {
    pub fingerprint: String,
    pub reason: String,
}

/// Shared between the verifier (which fills it) and the client (which reads it on a failed
/// connection).
pub type RejectionSlot = Arc<Mutex<Option<Rejection>>>;

#[derive(Debug)]
enum Mode {
    Pin([u8; 32]),
    Roots(Arc<WebPkiServerVerifier>),
    Insecure,
}

#[derive(Debug)]
struct Verifier {
    mode: Mode,
    provider: Arc<CryptoProvider>,
    rejected: RejectionSlot,
}

impl Verifier {
    fn reject(&self, fp: &[u8], reason: String) {
        if let Ok(mut slot) = self.rejected.lock() {
            *slot = Some(Rejection {
                fingerprint: format_fingerprint(fp),
                reason,
            });
        }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        match &self.mode {
            Mode::Insecure => Ok(ServerCertVerified::assertion()),
            Mode::Pin(want) => {
                if &fp == want {
                    Ok(ServerCertVerified::assertion())
                } else {
                    self.reject(
                        &fp,
                        format!(
                            "its SHA-256 fingerprint is not the one pinned in proxmox.tls.fingerprint ({})",
                            format_fingerprint(want)
                        ),
                    );
                    Err(rustls::Error::General(
                        "certificate fingerprint does not match proxmox.tls.fingerprint".into(),
                    ))
                }
            }
            Mode::Roots(inner) => inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .inspect_err(|e| self.reject(&fp, e.to_string())),
        }
    }

    // The handshake signatures are checked in every mode: a pinned certificate proves nothing
    // unless the server holds its key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls configuration for these settings, and the slot where refusals are noted.
pub fn client_config(
    settings: &TlsSettings,
) -> Result<(Arc<ClientConfig>, RejectionSlot), PveError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rejected: RejectionSlot = Arc::default();
    let mode = if settings.insecure {
        Mode::Insecure
    } else if let Some(fp) = settings.fingerprint {
        Mode::Pin(fp)
    } else {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = &settings.ca_file {
            add_ca_file(&mut roots, ca)?;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| PveError::Config(format!("TLS set-up failed: {e}")))?;
        Mode::Roots(verifier)
    };
    let verifier = Verifier {
        mode,
        provider: provider.clone(),
        rejected: rejected.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PveError::Config(format!("TLS set-up failed: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((Arc::new(config), rejected))
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), PveError> {
    let bad =
        |why: String| PveError::Config(format!("proxmox.tls.ca_file `{}`: {why}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let plain = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let fp = parse_fingerprint(plain).unwrap();
        assert_eq!(fp[1], 0x11);
        assert_eq!(fp[31], 0xff);
        let colons = format_fingerprint(&fp);
        assert_eq!(&colons[..8], "00:11:22");
        assert_eq!(parse_fingerprint(&colons), Some(fp));
        assert_eq!(parse_fingerprint("00:11"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn missing_ca_file_is_a_clear_config_error() {
        let e = client_config(&TlsSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsSettings::default()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("proxmox.tls.ca_file `/nonexistent/ca.pem`"),
            "{e}"
        );
    }
}
