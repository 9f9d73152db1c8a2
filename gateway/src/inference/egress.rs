//! Where the gateway may connect to reach a provider. Anyone can register a provider, so
//! a base URL must not point the gateway at the inside of its own network: loopback,
//! private, link-local (cloud metadata), CGNAT, unique-local, unspecified, multicast and
//! reserved addresses are refused, unless `allow_private_providers` is on (the demo, the
//! tests, a private deployment).
//!
//! The check runs twice: at registration (`check_base_url`, which also resolves a name),
//! and at every connection, where a name may resolve elsewhere by then (DNS rebinding):
//! the provider clients resolve through `PublicOnly`, and an IP literal is checked before
//! each call (`check_connect`). The clients follow no redirects and ignore proxy
//! variables (`AppState::provider_client`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// Whether `ip` is a public unicast address the gateway may call.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let refused = ip.is_unspecified()
        || a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16: cloud metadata lives here
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // documentation
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // documentation
        || (a == 203 && b == 0 && c == 113) // documentation
        || ip.is_multicast()
        || a >= 240; // reserved and broadcast
    !refused
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    // An IPv4 address inside IPv6 (mapped ::ffff:a.b.c.d, compatible ::a.b.c.d, NAT64
    // 64:ff9b::/96, 6to4 2002::/16) is judged as that IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    if s[..6] == [0; 6] && !ip.is_unspecified() && !ip.is_loopback() {
        return is_public_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return is_public_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    if s[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    let refused = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique-local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0100 && s[1..4] == [0; 3]); // discard-only 100::/64
    !refused
}

/// A registration's `baseUrl`, checked: `http(s)://host[:port][/path]` with no
/// user info, query or fragment; unless `allow_private`, `https://` to a host whose
/// every address is public. Returns the URL without a trailing `/`.
pub async fn check_base_url(raw: &str, allow_private: bool) -> Result<String, String> {
    let url = Url::parse(raw).map_err(|e| format!("baseUrl is not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        "http" => return Err("baseUrl must be https:// on this gateway".to_owned()),
        _ => return Err("baseUrl must be an http(s):// URL".to_owned()),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("baseUrl must not carry a user name or password".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("baseUrl must not carry a query or a fragment".to_owned());
    }
    let Some(host) = url.host() else { return Err("baseUrl has no host".to_owned()) };
    if !allow_private {
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs: Vec<IpAddr> = match host {
            url::Host::Ipv4(ip) => vec![IpAddr::V4(ip)],
            url::Host::Ipv6(ip) => vec![IpAddr::V6(ip)],
            url::Host::Domain(name) => tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| format!("baseUrl's host {name} does not resolve: {e}"))?
                .map(|a| a.ip())
                .collect(),
        };
        if addrs.is_empty() {
            return Err("baseUrl's host has no address".to_owned());
        }
        if let Some(ip) = addrs.iter().find(|ip| !is_public(**ip)) {
            return Err(format!("baseUrl must reach a public address; {host} is {ip}"));
        }
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Before each call to a provider: an IP-literal host must still be public (names are
/// checked by `PublicOnly` when they are resolved).
pub fn check_connect(url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let url = Url::parse(url).map_err(|e| format!("bad provider URL: {e}"))?;
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(_)) => return Ok(()),
        None => return Err("provider URL has no host".to_owned()),
    };
    if is_public(ip) {
        Ok(())
    } else {
        Err(format!("provider address {ip} is not public"))
    }
}

/// The provider clients' resolver: the system's answer without its non-public
/// addresses; a name that resolves only to such addresses fails to connect.
pub struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves to no public address; providers must be reachable at public addresses").into();
                return Err(e);
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_addresses_are_refused_in_every_spelling() {
        let inside = [
            "127.0.0.1", "127.1.2.3", "0.0.0.0", "0.1.2.3", "10.0.0.5", "172.16.0.1", "172.31.255.255", "192.168.1.1",
            "169.254.169.254", "100.64.0.1", "100.127.255.254", "224.0.0.1", "255.255.255.255", "240.0.0.1",
            "192.0.2.1", "198.18.0.1", "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
            "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "2001:db8::1",
        ];
        for ip in inside {
            assert!(!is_public(ip.parse().unwrap()), "{ip} is inside");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[tokio::test]
    async fn base_urls_are_checked_by_form_and_address() {
        for (url, why) in [
            ("http://8.8.8.8/", "https"),
            ("https://169.254.169.254/latest/meta-data/", "public"),
            ("https://127.0.0.1:6379/", "public"),
            ("https://[::1]:5432/", "public"),
            ("https://[::ffff:127.0.0.1]/", "public"),
            ("https://10.0.0.5:2375/", "public"),
            ("https://0.0.0.0/", "public"),
            // The WHATWG parser reads a number as an IPv4 address: 2130706433 is 127.0.0.1.
            ("https://2130706433/", "public"),
            ("https://0x7f000001/", "public"),
            ("https://localhost:8080/", "public"),
            ("https://user:pw@8.8.8.8/", "user name"),
            ("https://8.8.8.8/v1?x=1", "query"),
            ("https://8.8.8.8/#frag", "fragment"),
            ("ftp://8.8.8.8/", "http"),
        ] {
            let err = check_base_url(url, false).await.unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
        assert_eq!(check_base_url("https://8.8.8.8:8443/v1/", false).await.unwrap(), "https://8.8.8.8:8443/v1");
        assert_eq!(check_base_url("http://127.0.0.1:9000/", true).await.unwrap(), "http://127.0.0.1:9000");
        assert!(check_base_url("http://u:p@127.0.0.1:9000/", true).await.is_err(), "user info is refused even when private is allowed");
    }

    #[tokio::test]
    async fn the_resolver_drops_inside_addresses() {
        let name: Name = "localhost".parse().unwrap();
        assert!(PublicOnly.resolve(name).await.is_err(), "localhost resolves only to loopback");
        assert!(check_connect("http://127.0.0.1:1/", false).is_err());
        assert!(check_connect("http://[::ffff:10.0.0.1]:1/", false).is_err());
        assert!(check_connect("http://127.0.0.1:1/", true).is_ok());
        assert!(check_connect("https://provider.example/", false).is_ok(), "names are checked when resolved");
    }
}
