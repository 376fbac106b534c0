//! Age keys from SSH ed25519 host keys: the sops-nix convention, what `ssh-to-age` does.
//!
//! A host's age recipient is its ed25519 public key mapped to the X25519 (Montgomery) form,
//! `u = (1 + y) / (1 - y) mod 2^255 - 19`, bech32-encoded with the HRP `age`. On the host,
//! sops-nix (`sops.age.sshKeyPaths`) converts the private key the same way: the X25519 secret
//! is the first half of SHA-512 of the ed25519 seed, and the identity is that scalar
//! bech32-encoded with the HRP `AGE-SECRET-KEY-` in capitals.
//!
//! Pure functions, no I/O. Nothing here is hand-written cryptography: `ssh-key` parses the
//! OpenSSH formats, `curve25519-dalek` decodes the point and maps it to Montgomery form,
//! `bech32` and `base64` do the encodings.

use base64::Engine as _;
use bech32::{Bech32, Hrp};
use curve25519_dalek::edwards::CompressedEdwardsY;
use sha2::{Digest, Sha512};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not an SSH ed25519 public key (expected `ssh-ed25519 AAAA...`)")]
    NotEd25519Public,
    #[error("the SSH public key is malformed: {0}")]
    Malformed(ssh_key::Error),
    #[error("the ed25519 public key is not a point of the curve")]
    NotOnCurve,
    #[error("the ed25519 public key is a point of small order, which is no one's key")]
    SmallOrder,
    #[error("not an unencrypted OpenSSH ed25519 private key: {0}")]
    Private(&'static str),
}

/// Encodes URL-safe base64 without padding (RFC 4648 §5): for generated passwords.
pub fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Bech32 (BIP 173, not bech32m) of `data` under `hrp`, in lower case; upper case for
/// identities, as age writes them.
fn bech32(hrp: &str, data: &[u8], upper: bool) -> String {
    // Both HRPs are constants of this module and the data is 32 bytes, far below bech32's
    // length limit, so neither step can fail.
    let hrp = Hrp::parse(hrp).expect("a valid bech32 HRP");
    let encoded = if upper {
        bech32::encode_upper::<Bech32>(hrp, data)
    } else {
        bech32::encode::<Bech32>(hrp, data)
    };
    encoded.expect("32 bytes are within bech32's length limit")
}

/// The 32-byte ed25519 public key of an `ssh-ed25519 AAAA... [comment]` line.
pub fn ed25519_public_key(line: &str) -> Result<[u8; 32], KeyError> {
    if line.split_whitespace().next() != Some("ssh-ed25519") {
        return Err(KeyError::NotEd25519Public);
    }
    let key = ssh_key::PublicKey::from_openssh(line.trim()).map_err(KeyError::Malformed)?;
    key.key_data()
        .ed25519()
        .map(|k| k.0)
        .ok_or(KeyError::NotEd25519Public)
}

/// The age recipient (`age1...`) of an SSH ed25519 public key, as `ssh-to-age` computes it.
pub fn ssh_to_age(line: &str) -> Result<String, KeyError> {
    let key = ed25519_public_key(line)?;
    Ok(bech32("age", &montgomery_u(&key)?, false))
}

/// The Montgomery `u` of an encoded ed25519 point. Like `ssh-to-age` (Go's
/// `filippo.io/edwards25519`), only canonical encodings are points (RFC 8032 §5.1.3): dalek
/// also decodes `y ≥ p` and `-0`, so the point must encode back to the same bytes.
fn montgomery_u(key: &[u8; 32]) -> Result<[u8; 32], KeyError> {
    let point = CompressedEdwardsY(*key)
        .decompress()
        .filter(|p| p.compress().as_bytes() == key)
        .ok_or(KeyError::NotOnCurve)?;
    if point.is_small_order() {
        return Err(KeyError::SmallOrder);
    }
    Ok(point.to_montgomery().to_bytes())
}

/// The age identity (`AGE-SECRET-KEY-1...`) of an unencrypted OpenSSH ed25519 private key
/// (`-----BEGIN OPENSSH PRIVATE KEY-----`), as sops-nix derives it on the host.
pub fn ssh_private_to_age(pem: &str) -> Result<String, KeyError> {
    let key = ssh_key::PrivateKey::from_openssh(pem.trim())
        .map_err(|_| KeyError::Private("not an OpenSSH private key"))?;
    if key.is_encrypted() {
        return Err(KeyError::Private("the key is passphrase-protected"));
    }
    let pair = key
        .key_data()
        .ed25519()
        .ok_or(KeyError::Private("not an ed25519 key"))?;
    let digest = Sha512::digest(pair.private.as_ref());
    let mut scalar = [0u8; 32];
    scalar.copy_from_slice(&digest[..32]);
    // X25519's clamping, as age's identity encoding expects.
    scalar[0] &= 248;
    scalar[31] &= 127;
    scalar[31] |= 64;
    Ok(bech32("age-secret-key-", &scalar, true))
}

/// Whether `s` is an age X25519 recipient: bech32 with a valid checksum, HRP `age`, 32 bytes.
pub fn is_age_recipient(s: &str) -> bool {
    bech32::primitives::decode::CheckedHrpstring::new::<Bech32>(s)
        .is_ok_and(|c| c.hrp().as_str() == "age" && c.byte_iter().count() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base64_std(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn public_line(key: &[u8; 32]) -> String {
        let mut blob = vec![0, 0, 0, 11];
        blob.extend(b"ssh-ed25519");
        blob.extend([0, 0, 0, 32]);
        blob.extend(key);
        format!("ssh-ed25519 {}", base64_std(&blob))
    }

    #[test]
    fn base64url_has_no_padding() {
        assert_eq!(base64url(b"hello!?"), "aGVsbG8hPw");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(&[0u8; 32]).len(), 43);
    }

    #[test]
    fn bech32_matches_bip173_vectors() {
        // BIP 173 valid test vectors.
        assert_eq!(bech32("a", &[], false), "a12uel5l");
        assert_eq!(bech32("a", &[], true), "A12UEL5L");
        assert_eq!(
            bech32(
                "abcdef",
                &[
                    0x00, 0x44, 0x32, 0x14, 0xc7, 0x42, 0x54, 0xb6, 0x35, 0xcf, 0x84, 0x65, 0x3a,
                    0x56, 0xd7, 0xc6, 0x75, 0xbe, 0x77, 0xdf
                ],
                false
            ),
            "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw"
        );
    }

    #[test]
    fn the_base_point_converts_to_u_9() {
        // Ed25519's base point (y = 4/5) maps to Curve25519's (u = 9).
        let mut y = [0x66u8; 32];
        y[0] = 0x58;
        let mut nine = [0u8; 32];
        nine[0] = 9;
        assert_eq!(montgomery_u(&y), Ok(nine));
    }

    #[test]
    fn rejects_keys_that_are_not_ed25519_points() {
        assert_eq!(
            ssh_to_age("ssh-rsa AAAAB3NzaC1yc2E="),
            Err(KeyError::NotEd25519Public)
        );
        assert!(matches!(
            ssh_to_age("ssh-ed25519 !!!"),
            Err(KeyError::Malformed(_))
        ));
        // y = 2 is not on the curve.
        let mut y = [0u8; 32];
        y[0] = 2;
        assert_eq!(ssh_to_age(&public_line(&y)), Err(KeyError::NotOnCurve));
        // y = p + 1 is y = 1 written non-canonically: Go's edwards25519, and so ssh-to-age,
        // refuse it; dalek alone would decode it.
        let mut p_plus_1 = [0xffu8; 32];
        p_plus_1[0] = 0xee;
        p_plus_1[31] = 0x7f;
        assert_eq!(
            ssh_to_age(&public_line(&p_plus_1)),
            Err(KeyError::NotOnCurve)
        );
        // The identity (y = 1) is on the curve but has no Montgomery form (1 - y = 0); the
        // hand-written conversion refused it too, as not a point. It is refused by name now.
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(ssh_to_age(&public_line(&one)), Err(KeyError::SmallOrder));
    }

    #[test]
    fn recipient_shape() {
        assert!(is_age_recipient(
            "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
        ));
        assert!(!is_age_recipient("age1short"));
        // One character changed: the checksum catches it (the old shape check did not).
        assert!(!is_age_recipient(
            "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8q"
        ));
    }
}
