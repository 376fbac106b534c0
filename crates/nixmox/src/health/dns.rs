//! A DNS check: one A query over UDP to one server, answered or not within a deadline.
//! hickory-proto writes the query and reads the answer; the exchange (one socket, resent every
//! second, bounded by the check's deadline) is here, with no async runtime.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

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

/// The query message for `name`'s A records, recursion desired.
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let not_a_name = || format!("`{name}` is not a DNS name");
    // hickory accepts an empty label in the middle (`a..b`); a query for one would only fail
    // at the server, so it is refused here.
    if name.trim_end_matches('.').split('.').any(str::is_empty) {
        return Err(not_a_name());
    }
    let name = Name::from_ascii(name).map_err(|_| not_a_name())?;
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, RecordType::A));
    message
        .to_vec()
        .map_err(|e| format!("cannot encode the query: {e}"))
}

/// Parses a response to query `id`; `None` when it is not one (another id, not a response,
/// not a DNS message).
pub fn decode_answer(id: u16, r: &[u8]) -> Option<Answer> {
    let message = Message::from_vec(r).ok()?;
    if message.metadata.id != id || message.metadata.message_type != MessageType::Response {
        return None;
    }
    let addrs = message
        .answers
        .iter()
        .filter(|rr| rr.dns_class == DNSClass::IN)
        .filter_map(|rr| match &rr.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Some(Answer {
        rcode: message.metadata.response_code.low(),
        addrs,
    })
}

/// Asks `server` for `name`'s A records, resending every second until `deadline`.
pub fn query(server: SocketAddrV4, name: &str, deadline: Instant) -> Result<Answer, String> {
    // A random id (hickory's), so an answer to someone else's query is not taken for ours.
    let id = Message::query().metadata.id;
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
        assert!(decode_answer(0x1234, b"not dns").is_none());
        // The query itself is not an answer.
        assert!(decode_answer(0x1234, &q).is_none());
    }
}
