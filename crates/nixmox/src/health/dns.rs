//! A tiny DNS client: one A query over UDP to one server, answered or not within a deadline.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the server said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The response code (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED, …).
    pub rcode: u8,
    /// The A records in the answer section, in order (CNAME targets' included).
    pub addrs: Vec<Ipv4Addr>,
}

impl Answer {
    /// Words to follow "got": `127.0.0.5`, `127.0.0.5, 127.0.0.6`, `NXDOMAIN`, `no A record`.
    pub fn describe(&self) -> String {
        if self.rcode != 0 {
            return rcode_name(self.rcode);
        }
        if self.addrs.is_empty() {
            return "no A record (NOERROR, empty answer)".into();
        }
        self.addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN (no such name)".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("response code {n}"),
    }
}

static NEXT_ID: AtomicU16 = AtomicU16::new(0);

fn query_id() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos as u16) ^ NEXT_ID.fetch_add(0x9e37, Ordering::Relaxed)
}

/// The query message for `name`'s A records, recursion desired.
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` is not a DNS name"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    Ok(q)
}

/// Parses a response to query `id`; `None` when it is not one (another id, too short).
pub fn decode_answer(id: u16, r: &[u8]) -> Option<Answer> {
    if r.len() < 12 || r[0..2] != id.to_be_bytes() || r[2] & 0x80 == 0 {
        return None;
    }
    let rcode = r[3] & 0x0f;
    let qd = u16::from_be_bytes([r[4], r[5]]);
    let an = u16::from_be_bytes([r[6], r[7]]);
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let len = *r.get(i)? as usize;
            if len == 0 {
                return Some(i + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            i += len + 1;
        }
    };
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        i = skip_name(i)?;
        let rr = r.get(i..i + 10)?;
        let ty = u16::from_be_bytes([rr[0], rr[1]]);
        let class = u16::from_be_bytes([rr[2], rr[3]]);
        let len = u16::from_be_bytes([rr[8], rr[9]]) as usize;
        let data = r.get(i + 10..i + 10 + len)?;
        if ty == 1 && class == 1 && len == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Some(Answer { rcode, addrs })
}

/// Asks `server` for `name`'s A records, resending every second until `deadline`.
pub fn query(server: SocketAddrV4, name: &str, deadline: Instant) -> Result<Answer, String> {
    let id = query_id();
    let msg = encode_query(id, name)?;
    let bind: SocketAddr = if server.ip().is_loopback() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("no UDP socket: {e}"))?;
    sock.connect(server)
        .map_err(|e| format!("cannot reach {server}: {e}"))?;
    let mut buf = [0u8; 4096];
    let mut resend = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err("no answer in time".into());
        }
        if now >= resend {
            sock.send(&msg).map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "port unreachable (nothing listens)".into()
                }
                _ => format!("cannot send the query: {e}"),
            })?;
            resend = now + Duration::from_secs(1);
        }
        let wait = deadline
            .min(resend)
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        sock.set_read_timeout(Some(wait))
            .map_err(|e| format!("cannot wait for an answer: {e}"))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                if let Some(a) = decode_answer(id, &buf[..n]) {
                    return Ok(a);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err("port unreachable (nothing listens)".into())
            }
            Err(e) => return Err(format!("no answer: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_and_its_answer_round_trip() {
        let q = encode_query(0x1234, "dns.lab.lan.").unwrap();
        assert_eq!(&q[12..16], &[3, b'd', b'n', b's']);
        // The answer: the question echoed, one A record by compression pointer.
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 41]);
        let a = decode_answer(0x1234, &r).unwrap();
        assert_eq!(a.addrs, vec![Ipv4Addr::new(127, 0, 0, 41)]);
        assert_eq!(a.describe(), "127.0.0.41");
        assert!(decode_answer(0x9999, &r).is_none());
        r[3] = 0x83;
        r[7] = 0;
        r.truncate(q.len());
        assert_eq!(
            decode_answer(0x1234, &r).unwrap().describe(),
            "NXDOMAIN (no such name)"
        );
        assert!(encode_query(1, "a..b").is_err());
    }
}
