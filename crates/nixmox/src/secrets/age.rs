//! Age keys from SSH ed25519 host keys: the sops-nix convention, what `ssh-to-age` does.
//!
//! A host's age recipient is its ed25519 public key converted to the X25519 (Montgomery) form,
//! `u = (1 + y) / (1 - y) mod 2^255 - 19`, bech32-encoded with the HRP `age`. On the host,
//! sops-nix (`sops.age.sshKeyPaths`) converts the private key the same way: the X25519 secret
//! is the first half of SHA-512 of the ed25519 seed, and the identity is that scalar
//! bech32-encoded with the HRP `AGE-SECRET-KEY-` in capitals.
//!
//! Pure functions, no I/O. The field arithmetic is the textbook radix-2^51 representation; it
//! only ever handles public values (the public-key conversion), so it need not be constant
//! time. The private-key conversion involves no curve arithmetic at all.

use sha2::{Digest, Sha512};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not an SSH ed25519 public key (expected `ssh-ed25519 AAAA...`)")]
    NotEd25519Public,
    #[error("the SSH public key is not valid base64")]
    Base64,
    #[error("the SSH public key's blob is malformed")]
    Blob,
    #[error("the ed25519 public key is not a point of the curve")]
    NotOnCurve,
    #[error("not an unencrypted OpenSSH ed25519 private key: {0}")]
    Private(&'static str),
}

// ---------------------------------------------------------------- base64 (standard alphabet)

/// Decodes standard base64 (RFC 4648 §4), ignoring ASCII whitespace; `=` padding optional.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    let mut padding = false;
    for &c in text.as_bytes() {
        if c.is_ascii_whitespace() {
            continue;
        }
        if c == b'=' {
            padding = true;
            continue;
        }
        if padding {
            return None;
        }
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be zero padding of fewer than 8 bits.
    if bits >= 6 || acc != 0 {
        return None;
    }
    Some(out)
}

/// Encodes URL-safe base64 without padding (RFC 4648 §5): for generated passwords.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// ---------------------------------------------------------------- bech32 (BIP 173)

const BECH32_CHARSET: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";

fn bech32_polymod(values: &[u8]) -> u32 {
    const GEN: [u32; 5] = [
        0x3b6a_57b2,
        0x2650_8e6d,
        0x1ea1_19fa,
        0x3d42_33dd,
        0x2a14_62b3,
    ];
    let mut chk: u32 = 1;
    for &v in values {
        let top = chk >> 25;
        chk = ((chk & 0x01ff_ffff) << 5) ^ u32::from(v);
        for (i, g) in GEN.iter().enumerate() {
            if (top >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    chk
}

/// Bech32-encodes `data` under a lowercase `hrp` (no length limit, as age does).
pub fn bech32_encode(hrp: &str, data: &[u8]) -> String {
    // 8-bit groups to 5-bit groups, padded with zeros.
    let mut five = Vec::with_capacity(data.len() * 8 / 5 + 1);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            five.push(((acc >> bits) & 31) as u8);
        }
    }
    if bits > 0 {
        five.push(((acc << (5 - bits)) & 31) as u8);
    }
    let mut values: Vec<u8> = hrp.bytes().map(|c| c >> 5).collect();
    values.push(0);
    values.extend(hrp.bytes().map(|c| c & 31));
    values.extend(&five);
    values.extend([0u8; 6]);
    let polymod = bech32_polymod(&values) ^ 1;
    let mut out = String::with_capacity(hrp.len() + 1 + five.len() + 6);
    out.push_str(hrp);
    out.push('1');
    for v in five {
        out.push(BECH32_CHARSET[v as usize] as char);
    }
    for i in 0..6 {
        out.push(BECH32_CHARSET[((polymod >> (5 * (5 - i))) & 31) as usize] as char);
    }
    out
}

// ---------------------------------------------------------------- GF(2^255 - 19)

const MASK: u64 = (1 << 51) - 1;

/// A field element, value = Σ l[i]·2^(51·i), limbs kept below about 2^52.
#[derive(Clone, Copy, Debug)]
struct Fe([u64; 5]);

impl Fe {
    const ZERO: Fe = Fe([0; 5]);
    const ONE: Fe = Fe([1, 0, 0, 0, 0]);

    fn small(n: u64) -> Fe {
        Fe([n, 0, 0, 0, 0])
    }

    /// From 32 little-endian bytes, ignoring the top bit.
    fn from_bytes(b: &[u8; 32]) -> Fe {
        let load = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Fe([
            load(0) & MASK,
            (load(6) >> 3) & MASK,
            (load(12) >> 6) & MASK,
            (load(19) >> 1) & MASK,
            (load(24) >> 12) & MASK,
        ])
    }

    fn carry(mut l: [u128; 5]) -> Fe {
        for _ in 0..2 {
            for i in 0..4 {
                l[i + 1] += l[i] >> 51;
                l[i] &= MASK as u128;
            }
            let c = l[4] >> 51;
            l[4] &= MASK as u128;
            l[0] += 19 * c;
        }
        Fe(l.map(|x| x as u64))
    }

    fn add(self, o: Fe) -> Fe {
        let mut l = [0u128; 5];
        for (i, x) in l.iter_mut().enumerate() {
            *x = u128::from(self.0[i]) + u128::from(o.0[i]);
        }
        Fe::carry(l)
    }

    fn sub(self, o: Fe) -> Fe {
        // self + 4p - o keeps every limb positive (limbs are below 2^53).
        const FOUR_P: [u64; 5] = [4 * ((1 << 51) - 19), 4 * MASK, 4 * MASK, 4 * MASK, 4 * MASK];
        let mut l = [0u128; 5];
        for (i, x) in l.iter_mut().enumerate() {
            *x = u128::from(self.0[i]) + u128::from(FOUR_P[i]) - u128::from(o.0[i]);
        }
        Fe::carry(l)
    }

    fn mul(self, o: Fe) -> Fe {
        let a = self.0.map(u128::from);
        let b = o.0.map(u128::from);
        let r0 = a[0] * b[0] + 19 * (a[1] * b[4] + a[2] * b[3] + a[3] * b[2] + a[4] * b[1]);
        let r1 = a[0] * b[1] + a[1] * b[0] + 19 * (a[2] * b[4] + a[3] * b[3] + a[4] * b[2]);
        let r2 = a[0] * b[2] + a[1] * b[1] + a[2] * b[0] + 19 * (a[3] * b[4] + a[4] * b[3]);
        let r3 = a[0] * b[3] + a[1] * b[2] + a[2] * b[1] + a[3] * b[0] + 19 * (a[4] * b[4]);
        let r4 = a[0] * b[4] + a[1] * b[3] + a[2] * b[2] + a[3] * b[1] + a[4] * b[0];
        Fe::carry([r0, r1, r2, r3, r4])
    }

    /// self^e for a 255-bit little-endian exponent.
    fn pow(self, e: &[u8; 32]) -> Fe {
        let mut r = Fe::ONE;
        for i in (0..256).rev() {
            r = r.mul(r);
            if (e[i / 8] >> (i % 8)) & 1 == 1 {
                r = r.mul(self);
            }
        }
        r
    }

    /// The multiplicative inverse (Fermat: self^(p-2)); zero maps to zero.
    fn invert(self) -> Fe {
        let mut e = [0xffu8; 32];
        e[0] = 0xeb;
        e[31] = 0x7f;
        self.pow(&e)
    }

    /// Canonical little-endian bytes.
    fn to_bytes(self) -> [u8; 32] {
        let mut l = self.0;
        // Every limb below 2^51 (the value is then below 2^255).
        while l.iter().any(|&x| x > MASK) {
            for i in 0..4 {
                l[i + 1] += l[i] >> 51;
                l[i] &= MASK;
            }
            let c = l[4] >> 51;
            l[4] &= MASK;
            l[0] += 19 * c;
        }
        // q = 1 iff the value is at least p.
        let mut q = (l[0] + 19) >> 51;
        for x in &l[1..] {
            q = (x + q) >> 51;
        }
        l[0] += 19 * q;
        for i in 0..4 {
            l[i + 1] += l[i] >> 51;
            l[i] &= MASK;
        }
        l[4] &= MASK;
        let mut out = [0u8; 32];
        let mut acc: u128 = 0;
        let mut bits = 0;
        let mut k = 0;
        for limb in l {
            acc |= u128::from(limb) << bits;
            bits += 51;
            while bits >= 8 && k < 32 {
                out[k] = acc as u8;
                acc >>= 8;
                bits -= 8;
                k += 1;
            }
        }
        if k < 32 {
            out[k] = acc as u8;
        }
        out
    }

    fn is_zero(self) -> bool {
        self.to_bytes() == [0u8; 32]
    }

    fn equals(self, o: Fe) -> bool {
        self.to_bytes() == o.to_bytes()
    }
}

/// Whether an encoded ed25519 point decodes to a point of the curve (RFC 8032 §5.1.3): y below
/// p, x² = (y² - 1) / (d·y² + 1) a square, and not x = 0 with the sign bit set.
fn on_curve(point: &[u8; 32]) -> bool {
    let y = Fe::from_bytes(point);
    let mut canonical = *point;
    canonical[31] &= 0x7f;
    if y.to_bytes() != canonical {
        return false;
    }
    // d = -121665 / 121666
    let d = Fe::ZERO
        .sub(Fe::small(121_665))
        .mul(Fe::small(121_666).invert());
    let yy = y.mul(y);
    let u = yy.sub(Fe::ONE);
    let v = d.mul(yy).add(Fe::ONE);
    let xx = u.mul(v.invert());
    if xx.is_zero() {
        return point[31] & 0x80 == 0;
    }
    // Euler's criterion: xx^((p-1)/2) = 1 for a square.
    let mut e = [0xffu8; 32];
    e[0] = 0xf6;
    e[31] = 0x3f;
    xx.pow(&e).equals(Fe::ONE)
}

// ---------------------------------------------------------------- SSH keys

fn read_string<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    if buf.len() < 4 {
        return None;
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let rest = &buf[4..];
    if rest.len() < n {
        return None;
    }
    let (s, tail) = rest.split_at(n);
    *buf = tail;
    Some(s)
}

fn read_u32(buf: &mut &[u8]) -> Option<u32> {
    if buf.len() < 4 {
        return None;
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    *buf = &buf[4..];
    Some(n)
}

/// The 32-byte ed25519 public key of an `ssh-ed25519 AAAA... [comment]` line.
pub fn ed25519_public_key(line: &str) -> Result<[u8; 32], KeyError> {
    let mut words = line.split_whitespace();
    if words.next() != Some("ssh-ed25519") {
        return Err(KeyError::NotEd25519Public);
    }
    let blob = words.next().ok_or(KeyError::NotEd25519Public)?;
    let blob = base64_decode(blob).ok_or(KeyError::Base64)?;
    let mut b = blob.as_slice();
    if read_string(&mut b) != Some(b"ssh-ed25519".as_slice()) {
        return Err(KeyError::Blob);
    }
    let key = read_string(&mut b).ok_or(KeyError::Blob)?;
    if !b.is_empty() || key.len() != 32 {
        return Err(KeyError::Blob);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(key);
    Ok(out)
}

/// The age recipient (`age1...`) of an SSH ed25519 public key, as `ssh-to-age` computes it.
pub fn ssh_to_age(line: &str) -> Result<String, KeyError> {
    let key = ed25519_public_key(line)?;
    if !on_curve(&key) {
        return Err(KeyError::NotOnCurve);
    }
    let y = Fe::from_bytes(&key);
    let denominator = Fe::ONE.sub(y);
    if denominator.is_zero() {
        // The identity point: no Montgomery form.
        return Err(KeyError::NotOnCurve);
    }
    let u = Fe::ONE.add(y).mul(denominator.invert());
    Ok(bech32_encode("age", &u.to_bytes()))
}

/// The age identity (`AGE-SECRET-KEY-1...`) of an unencrypted OpenSSH ed25519 private key
/// (`-----BEGIN OPENSSH PRIVATE KEY-----`), as sops-nix derives it on the host.
pub fn ssh_private_to_age(pem: &str) -> Result<String, KeyError> {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let body = pem
        .split_once(BEGIN)
        .and_then(|(_, rest)| rest.split_once(END))
        .map(|(b, _)| b)
        .ok_or(KeyError::Private("no OPENSSH PRIVATE KEY block"))?;
    let bytes = base64_decode(body).ok_or(KeyError::Private("not base64"))?;
    let mut b = bytes
        .strip_prefix(b"openssh-key-v1\0".as_slice())
        .ok_or(KeyError::Private("not openssh-key-v1"))?;
    let cipher = read_string(&mut b).ok_or(KeyError::Private("truncated"))?;
    if cipher != b"none" {
        return Err(KeyError::Private("the key is passphrase-protected"));
    }
    let _kdf = read_string(&mut b).ok_or(KeyError::Private("truncated"))?;
    let _kdf_options = read_string(&mut b).ok_or(KeyError::Private("truncated"))?;
    if read_u32(&mut b) != Some(1) {
        return Err(KeyError::Private("expected exactly one key"));
    }
    let _public = read_string(&mut b).ok_or(KeyError::Private("truncated"))?;
    let mut private = read_string(&mut b).ok_or(KeyError::Private("truncated"))?;
    let check1 = read_u32(&mut private);
    let check2 = read_u32(&mut private);
    if check1.is_none() || check1 != check2 {
        return Err(KeyError::Private("check words differ"));
    }
    if read_string(&mut private) != Some(b"ssh-ed25519".as_slice()) {
        return Err(KeyError::Private("not an ed25519 key"));
    }
    let _pk = read_string(&mut private).ok_or(KeyError::Private("truncated"))?;
    let sk = read_string(&mut private).ok_or(KeyError::Private("truncated"))?;
    if sk.len() != 64 {
        return Err(KeyError::Private("bad ed25519 secret length"));
    }
    let digest = Sha512::digest(&sk[..32]);
    let mut scalar = [0u8; 32];
    scalar.copy_from_slice(&digest[..32]);
    scalar[0] &= 248;
    scalar[31] &= 127;
    scalar[31] |= 64;
    Ok(bech32_encode("age-secret-key-", &scalar).to_uppercase())
}

/// Whether `s` looks like an age X25519 recipient (`age1` and 58 bech32 characters).
pub fn is_age_recipient(s: &str) -> bool {
    s.len() == 62 && s.starts_with("age1") && s[4..].bytes().all(|c| BECH32_CHARSET.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_rejects_junk() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").unwrap(), b"hello!");
        assert!(base64_decode("aGVsbG8*").is_none());
        assert!(base64_decode("aGVsbG9=").is_none(), "non-zero padding bits");
        assert_eq!(base64url(b"hello!?"), "aGVsbG8hPw");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(&[0u8; 32]).len(), 43);
    }

    #[test]
    fn bech32_matches_bip173_vectors() {
        // BIP 173 valid test vectors (empty data).
        assert_eq!(bech32_encode("a", &[]), "a12uel5l");
        assert_eq!(
            bech32_encode(
                "abcdef",
                &[
                    0x00, 0x44, 0x32, 0x14, 0xc7, 0x42, 0x54, 0xb6, 0x35, 0xcf, 0x84, 0x65, 0x3a,
                    0x56, 0xd7, 0xc6, 0x75, 0xbe, 0x77, 0xdf
                ]
            ),
            "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw"
        );
    }

    #[test]
    fn field_arithmetic_is_consistent() {
        let a = Fe::small(123_456_789);
        let b = Fe::small(987_654_321);
        assert!(a.mul(a.invert()).equals(Fe::ONE));
        assert!(a.add(b).sub(b).equals(a));
        assert!(Fe::ZERO.sub(Fe::ONE).add(Fe::ONE).is_zero());
        // p - 1 encodes as ec ff .. ff 7f.
        let mut pm1 = [0xffu8; 32];
        pm1[0] = 0xec;
        pm1[31] = 0x7f;
        assert_eq!(Fe::ZERO.sub(Fe::ONE).to_bytes(), pm1);
        // p itself reduces to zero.
        let mut p = pm1;
        p[0] = 0xed;
        assert!(Fe::from_bytes(&p).is_zero());
    }

    #[test]
    fn the_base_point_converts_to_u_9() {
        // Ed25519's base point (y = 4/5) maps to Curve25519's (u = 9).
        let mut y = [0x66u8; 32];
        y[0] = 0x58;
        assert!(on_curve(&y));
        let yf = Fe::from_bytes(&y);
        let u = Fe::ONE.add(yf).mul(Fe::ONE.sub(yf).invert());
        assert_eq!(u.to_bytes(), Fe::small(9).to_bytes());
    }

    #[test]
    fn rejects_keys_that_are_not_ed25519_points() {
        assert_eq!(
            ssh_to_age("ssh-rsa AAAAB3NzaC1yc2E="),
            Err(KeyError::NotEd25519Public)
        );
        assert_eq!(ssh_to_age("ssh-ed25519 !!!"), Err(KeyError::Base64));
        // y = 2 is not on the curve.
        let mut blob = vec![0, 0, 0, 11];
        blob.extend(b"ssh-ed25519");
        blob.extend([0, 0, 0, 32]);
        let mut y = [0u8; 32];
        y[0] = 2;
        blob.extend(y);
        let line = format!("ssh-ed25519 {}", base64_std(&blob));
        assert_eq!(ssh_to_age(&line), Err(KeyError::NotOnCurve));
    }

    fn base64_std(bytes: &[u8]) -> String {
        let url = base64url(bytes).replace('-', "+").replace('_', "/");
        let pad = (4 - url.len() % 4) % 4;
        url + &"=".repeat(pad)
    }

    #[test]
    fn recipient_shape() {
        assert!(is_age_recipient(
            "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
        ));
        assert!(!is_age_recipient("age1short"));
    }
}
