//! Socket addresses in the one form both `tracer` and `ss` are compared in.

use std::net::SocketAddr;

/// Normalises `ADDR:PORT` the way tracer prints it: IPv4 `1.2.3.4:80`, IPv6
/// (including IPv4-mapped) in brackets, RFC 5952 form: `[::1]:80`,
/// `[::ffff:127.0.0.1]:80`. `ss` already prints this form; parsing and
/// re-printing makes both sides canonical. Unparseable input (e.g. `*:*`,
/// scoped `%iface` addresses) is returned unchanged.
pub fn normalize_addr(s: &str) -> String {
    s.parse::<SocketAddr>()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| s.to_string())
}

/// The port of an `ADDR:PORT` string (IPv6 in brackets), if it has one.
pub fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_addresses_like_tracer() {
        assert_eq!(normalize_addr("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(normalize_addr("[::1]:80"), "[::1]:80");
        assert_eq!(normalize_addr("[0:0:0:0:0:0:0:1]:80"), "[::1]:80");
        assert_eq!(normalize_addr("[::ffff:127.0.0.1]:80"), "[::ffff:127.0.0.1]:80");
        assert_eq!(normalize_addr("[::ffff:7f00:1]:80"), "[::ffff:127.0.0.1]:80");
        assert_eq!(normalize_addr("*:*"), "*:*");
    }

    #[test]
    fn ports() {
        assert_eq!(port_of("127.0.0.1:80"), Some(80));
        assert_eq!(port_of("[::ffff:127.0.0.1]:8080"), Some(8080));
        assert_eq!(port_of("*:*"), None);
        assert_eq!(port_of("?"), None);
    }
}
