//! The SSRF policy and the only HTTP client that steps may use.
//!
//! Outbound URLs come from partners' templates, so they are hostile input. The policy refuses
//! addresses inside the platform's own network: loopback, RFC 1918, CGNAT, link-local (with
//! the cloud metadata address 169.254.169.254), IPv6 ULA and link-local, unspecified,
//! multicast, broadcast and reserved ranges, IPv6 forms that embed one of those IPv4 addresses
//! (`::ffff:127.0.0.1`, NAT64, 6to4), and the names `localhost`, `*.localhost` and the cloud
//! metadata host names. Operators open holes with `WORKFLOWS_EGRESS_ALLOW`: a comma-separated
//! list of host names (the name is trusted, whatever it resolves to) and IPs or CIDRs (those
//! addresses are allowed, whatever name led there). Tests allow-list their local servers.
//!
//! The check runs twice:
//! 1. statically, when a template is saved and again before each request
//!    ([`EgressPolicy::check_url_static`]): scheme, userinfo, literal IPs, refused names;
//! 2. at connect time, in [`PolicyResolver`]: every address a name resolves to is checked, and
//!    refused ones are dropped, so a name that rebinds to 127.0.0.1 after the template was saved
//!    is refused where it matters. Literal-IP URLs never reach a resolver, which is why
//!    [`EgressClient::request`] repeats the static check.
//!
//! [`EgressClient`] also ignores `HTTP_PROXY`-style variables (a proxy would resolve names
//! itself, behind our back) and never follows redirects (a `302` to `http://169.254.169.254/`
//! is returned to the caller as it is).
//!
//! Must never: allow by default what it cannot classify as public, or hand out the inner
//! `reqwest::Client` (it would bypass the literal-IP check).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Method, RequestBuilder, Url};

/// The environment variable holding the allow-list.
pub const ALLOW_ENV: &str = "WORKFLOWS_EGRESS_ALLOW";

/// Host names refused by name (besides `localhost` and `*.localhost`): cloud metadata services.
const REFUSED_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Why an outbound address or URL is not allowed, or the policy could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// An entry of `WORKFLOWS_EGRESS_ALLOW` is neither a host name nor an IP/CIDR.
    #[error("invalid entry {entry:?} in WORKFLOWS_EGRESS_ALLOW: {reason}")]
    InvalidAllowEntry { entry: String, reason: String },
    /// The URL does not parse or has no host.
    #[error("invalid url: {reason}")]
    InvalidUrl { reason: String },
    /// Only `http` and `https` are allowed.
    #[error("url scheme {scheme:?} is not allowed: only http and https")]
    UnsupportedScheme { scheme: String },
    /// `http://user:pass@host/`: credentials belong in headers, and userinfo hides the host.
    #[error("url must not carry credentials (userinfo)")]
    UserInfo,
    /// The target is in a refused range or has a refused name and is not allow-listed.
    #[error("egress to {target} refused: {reason} (allow-list it in WORKFLOWS_EGRESS_ALLOW)")]
    Refused {
        target: String,
        reason: &'static str,
    },
    /// The name did not resolve (possibly transient).
    #[error("resolving {host} failed: {reason}")]
    Resolve { host: String, reason: String },
    /// The HTTP client could not be built.
    #[error("building the http client failed: {reason}")]
    Client { reason: String },
    /// A configuration value is missing or malformed.
    #[error("invalid configuration {name}: {reason}")]
    Config { name: String, reason: String },
}

/// Which outbound targets are allowed. Cheap to clone; share it behind an `Arc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Lowercase host names without a trailing dot.
    allow_hosts: Vec<String>,
    allow_nets: Vec<IpNet>,
}

impl EgressPolicy {
    /// A policy with an empty allow-list: every refused range and name is refused.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Parses the value of `WORKFLOWS_EGRESS_ALLOW`: comma-separated host names, IPs
    /// (`127.0.0.1`, `::1`, `[::1]`) and CIDRs (`10.0.0.0/8`, `fd00::/8`). Blank entries are
    /// ignored; a malformed CIDR or host is an error (a typo must not silently allow nothing).
    pub fn from_env_value(value: &str) -> Result<Self, EgressError> {
        let mut policy = Self::strict();
        for raw in value.split(',') {
            let entry = raw.trim();
            if entry.is_empty() {
                continue;
            }
            let invalid = |reason: &str| EgressError::InvalidAllowEntry {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            };
            if entry.contains('/') {
                let net: IpNet = entry.parse().map_err(|_| invalid("not a valid CIDR"))?;
                policy.allow_nets.push(net.trunc());
                continue;
            }
            let unbracketed = entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .unwrap_or(entry);
            if let Ok(ip) = unbracketed.parse::<IpAddr>() {
                policy.allow_nets.push(IpNet::from(ip));
                continue;
            }
            let host = normalize_host(entry);
            let valid = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
            if !valid {
                return Err(invalid("neither a host name, an IP nor a CIDR"));
            }
            policy.allow_hosts.push(host);
        }
        Ok(policy)
    }

    /// Reads `WORKFLOWS_EGRESS_ALLOW` (unset means an empty allow-list).
    pub fn from_env() -> Result<Self, EgressError> {
        match std::env::var(ALLOW_ENV) {
            Ok(value) => Self::from_env_value(&value),
            Err(std::env::VarError::NotPresent) => Ok(Self::strict()),
            Err(std::env::VarError::NotUnicode(_)) => Err(EgressError::Config {
                name: ALLOW_ENV.into(),
                reason: "not valid unicode".into(),
            }),
        }
    }

    /// Adds a host name to the allow-list.
    pub fn allow_host(mut self, host: &str) -> Self {
        self.allow_hosts.push(normalize_host(host));
        self
    }

    /// Adds an IP range to the allow-list.
    pub fn allow_net(mut self, net: IpNet) -> Self {
        self.allow_nets.push(net.trunc());
        self
    }

    /// Whether `host` (any case, trailing dot or not) is allow-listed by name.
    pub fn is_host_allowed(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.allow_hosts.contains(&host)
    }

    /// Whether `ip` (or the IPv4 address an IPv4-mapped IPv6 address carries) is allow-listed.
    pub fn is_ip_allowed(&self, ip: IpAddr) -> bool {
        let mapped = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow_nets
            .iter()
            .any(|net| net.contains(&ip) || mapped.is_some_and(|m| net.contains(&m)))
    }

    /// Checks one address that `host` (if any) resolved to, or a literal IP.
    pub fn check_ip(&self, host: Option<&str>, ip: IpAddr) -> Result<(), EgressError> {
        if host.is_some_and(|h| self.is_host_allowed(h)) || self.is_ip_allowed(ip) {
            return Ok(());
        }
        match refused_range(ip) {
            Some(reason) => Err(EgressError::Refused {
                target: match host {
                    Some(h) => format!("{h} ({ip})"),
                    None => ip.to_string(),
                },
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Checks a host name by name alone: `localhost`, `*.localhost` and metadata names are
    /// refused unless the name is allow-listed.
    pub fn check_host_name(&self, host: &str) -> Result<(), EgressError> {
        if self.is_host_allowed(host) {
            return Ok(());
        }
        let name = normalize_host(host);
        let reason = if name == "localhost" || name.ends_with(".localhost") {
            Some("localhost name")
        } else if REFUSED_NAMES.contains(&name.as_str()) {
            Some("cloud metadata host name")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(EgressError::Refused {
                target: host.to_owned(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The save-time check of a URL string: see [`EgressPolicy::check_url`].
    pub fn check_url_static(&self, url: &str) -> Result<(), EgressError> {
        self.parse_and_check(url).map(|_| ())
    }

    /// Parses `url` and applies [`EgressPolicy::check_url`], returning the parsed URL.
    pub fn parse_and_check(&self, url: &str) -> Result<Url, EgressError> {
        let parsed = Url::parse(url).map_err(|e| EgressError::InvalidUrl {
            reason: e.to_string(),
        })?;
        self.check_url(&parsed)?;
        Ok(parsed)
    }

    /// The static check: scheme `http`/`https`, no userinfo, a literal IP outside the refused
    /// ranges, or a name that is not refused by name. Names are resolved only at send time (by
    /// [`PolicyResolver`]), since what they resolve to can change.
    ///
    /// Note that the URL parser normalises numeric hosts (`http://2130706433/`,
    /// `http://0x7f.1/`) to the IPv4 address they mean, so those are caught as literals.
    pub fn check_url(&self, url: &Url) -> Result<(), EgressError> {
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(EgressError::UnsupportedScheme {
                    scheme: other.to_owned(),
                })
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EgressError::UserInfo);
        }
        match url.host() {
            None => Err(EgressError::InvalidUrl {
                reason: "no host".into(),
            }),
            Some(url::Host::Ipv4(ip)) => self.check_ip(None, IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(None, IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => self.check_host_name(name),
        }
    }
}

/// Lowercase, without trailing dots (`LocalHost.` and `localhost` are the same name).
fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Why `ip` is refused by default, or `None` for a public address.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Some("cloud metadata address")
    } else if a == 0 {
        Some("unspecified or 'this network' address (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback address")
    } else if ip.is_private() {
        Some("private address (RFC 1918)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("carrier-grade NAT address (100.64.0.0/10)")
    } else if ip.is_link_local() {
        Some("link-local address (169.254.0.0/16)")
    } else if ip.is_broadcast() {
        Some("broadcast address")
    } else if ip.is_multicast() {
        Some("multicast address")
    } else if a >= 240 {
        Some("reserved address (240.0.0.0/4)")
    } else if a == 192 && b == 0 && c == 0 {
        Some("IETF protocol assignment (192.0.0.0/24)")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking address (198.18.0.0/15)")
    } else {
        None
    }
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified address (::)");
    }
    if ip.is_loopback() {
        return Some("loopback address (::1)");
    }
    // IPv4-mapped (::ffff:a.b.c.d) and the deprecated IPv4-compatible (::a.b.c.d) forms.
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return refused_v4(v4).map(|_| "IPv6 form of a refused IPv4 address");
    }
    // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return refused_v4(v4).map(|_| "NAT64 form of a refused IPv4 address");
    }
    // 6to4 (2002::/16) carries an IPv4 address in bits 16..48.
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return refused_v4(v4).map(|_| "6to4 form of a refused IPv4 address");
    }
    if (s[0] & 0xfe00) == 0xfc00 {
        return Some("unique local address (fc00::/7)");
    }
    if (s[0] & 0xffc0) == 0xfe80 {
        return Some("link-local address (fe80::/10)");
    }
    if (s[0] & 0xffc0) == 0xfec0 {
        return Some("site-local address (fec0::/10)");
    }
    if ip.is_multicast() {
        return Some("multicast address");
    }
    None
}

/// Turns a host name into addresses. [`SystemLookup`] (the system resolver, through tokio) is
/// the default; tests and special deployments can substitute their own (e.g. to simulate a
/// name that rebinds to 127.0.0.1).
#[async_trait::async_trait]
pub trait HostLookup: Send + Sync + 'static {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>>;
}

/// The system resolver (`getaddrinfo`, via `tokio::net::lookup_host`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

#[async_trait::async_trait]
impl HostLookup for SystemLookup {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, 0))
            .await?
            .map(|addr| addr.ip())
            .collect())
    }
}

impl EgressPolicy {
    /// Keeps the addresses `host` resolved to that the policy allows, in order. Errors with the
    /// first refusal if none is left.
    pub fn filter_resolved(
        &self,
        host: &str,
        addrs: &[IpAddr],
    ) -> Result<Vec<IpAddr>, EgressError> {
        let mut allowed = Vec::new();
        let mut refusal = None;
        for &ip in addrs {
            match self.check_ip(Some(host), ip) {
                Ok(()) => allowed.push(ip),
                Err(e) => {
                    tracing::warn!(host, address = %ip, error = %e, "egress: dropped a refused address");
                    refusal.get_or_insert(e);
                }
            }
        }
        if allowed.is_empty() {
            return Err(refusal.unwrap_or_else(|| EgressError::Resolve {
                host: host.to_owned(),
                reason: "no addresses".into(),
            }));
        }
        Ok(allowed)
    }
}

/// A reqwest DNS resolver that resolves with a [`HostLookup`] and drops every address the
/// policy refuses. If nothing is left, resolution fails with [`EgressError::Refused`], which
/// [`crate::CallError`] classifies as fatal. Checking here, at connect time, is what defeats
/// DNS rebinding: the addresses checked are the addresses connected to.
#[derive(Clone)]
pub struct PolicyResolver {
    policy: Arc<EgressPolicy>,
    lookup: Arc<dyn HostLookup>,
}

impl std::fmt::Debug for PolicyResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyResolver")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl PolicyResolver {
    /// A resolver using the system resolver.
    pub fn new(policy: Arc<EgressPolicy>) -> Self {
        Self::with_lookup(policy, Arc::new(SystemLookup))
    }

    pub fn with_lookup(policy: Arc<EgressPolicy>, lookup: Arc<dyn HostLookup>) -> Self {
        Self { policy, lookup }
    }

    /// Resolves `host` and keeps only the addresses the policy allows (port 0: reqwest puts
    /// the URL's port in).
    pub async fn resolve_checked(&self, host: &str) -> Result<Vec<SocketAddr>, EgressError> {
        self.policy.check_host_name(host)?;
        let resolved = self
            .lookup
            .lookup(host)
            .await
            .map_err(|e| EgressError::Resolve {
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
        let allowed = self.policy.filter_resolved(host, &resolved)?;
        Ok(allowed
            .into_iter()
            .map(|ip| SocketAddr::new(ip, 0))
            .collect())
    }
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let resolver = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            match resolver.resolve_checked(&host).await {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                Err(e) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
            }
        })
    }
}

/// Connect and whole-request timeouts for outbound HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (per address).
    pub connect: Duration,
    /// The whole request: connect, send, and reading the response body.
    pub request: Duration,
}

impl Default for Timeouts {
    /// 5 s to connect, 30 s for the whole request.
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
        }
    }
}

/// The HTTP client for everything steps send: policy-checking resolver, no redirects, no
/// proxies, timeouts. Cheap to clone (shares one connection pool).
#[derive(Debug, Clone)]
pub struct EgressClient {
    policy: Arc<EgressPolicy>,
    http: reqwest::Client,
    timeouts: Timeouts,
}

impl EgressClient {
    /// Builds the client, resolving names with the system resolver. Fails only if reqwest
    /// cannot build one (e.g. TLS backend initialisation).
    pub fn new(policy: EgressPolicy, timeouts: Timeouts) -> Result<Self, EgressError> {
        Self::with_lookup(policy, timeouts, Arc::new(SystemLookup))
    }

    /// Like [`EgressClient::new`], resolving names with `lookup`.
    pub fn with_lookup(
        policy: EgressPolicy,
        timeouts: Timeouts,
        lookup: Arc<dyn HostLookup>,
    ) -> Result<Self, EgressError> {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(PolicyResolver::with_lookup(
                policy.clone(),
                lookup,
            )))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .user_agent(concat!(
                "payos-workflows-egress/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| EgressError::Client {
                reason: e.to_string(),
            })?;
        Ok(Self {
            policy,
            http,
            timeouts,
        })
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// A request to `url` after the static policy check (which covers literal IPs: those
    /// bypass the resolver). Names are checked again when the connection resolves them.
    pub fn request(&self, method: Method, url: &str) -> Result<RequestBuilder, EgressError> {
        let parsed = self.policy.parse_and_check(url)?;
        Ok(self.http.request(method, parsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "169.254.1.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fd00:ec2::254",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(refused_range(ip).is_some(), "{ip} should be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(refused_range(ip), None, "{ip} should be allowed");
        }
    }

    #[test]
    fn parses_allow_list() {
        let p =
            EgressPolicy::from_env_value(" 127.0.0.1, 10.0.0.0/8 ,[::1],Example.COM., ,").unwrap();
        assert!(p.is_ip_allowed("127.0.0.1".parse().unwrap()));
        assert!(p.is_ip_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.is_ip_allowed("127.0.0.2".parse().unwrap()));
        assert!(p.is_ip_allowed("10.9.9.9".parse().unwrap()));
        assert!(p.is_ip_allowed("::1".parse().unwrap()));
        assert!(p.is_host_allowed("example.com"));
        assert!(p.is_host_allowed("EXAMPLE.com."));
        for bad in [
            "10.0.0.0/33",
            "300.1.1.1/8",
            "fd00::/129",
            "a b",
            "http://x",
            "10.0.0.0/x",
        ] {
            assert!(
                matches!(
                    EgressPolicy::from_env_value(bad),
                    Err(EgressError::InvalidAllowEntry { .. })
                ),
                "{bad} should be rejected"
            );
        }
        assert_eq!(
            EgressPolicy::from_env_value("").unwrap(),
            EgressPolicy::strict()
        );
    }

    #[test]
    fn static_url_checks() {
        let p = EgressPolicy::strict();
        for url in [
            "http://127.0.0.1/",
            "http://10.0.0.5:8080/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://localhost/",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://metadata.google.internal/computeMetadata/v1/",
        ] {
            assert!(
                matches!(p.check_url_static(url), Err(EgressError::Refused { .. })),
                "{url} should be refused: {:?}",
                p.check_url_static(url)
            );
        }
        assert!(matches!(
            p.check_url_static("ftp://example.com/"),
            Err(EgressError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            p.check_url_static("file:///etc/passwd"),
            Err(EgressError::UnsupportedScheme { .. })
        ));
        assert_eq!(
            p.check_url_static("https://user:pw@example.com/"),
            Err(EgressError::UserInfo)
        );
        assert!(matches!(
            p.check_url_static("not a url"),
            Err(EgressError::InvalidUrl { .. })
        ));
        assert_eq!(p.check_url_static("https://example.com/hook"), Ok(()));
        assert_eq!(p.check_url_static("http://8.8.8.8/"), Ok(()));

        let allowed = EgressPolicy::from_env_value("127.0.0.1,localhost").unwrap();
        assert_eq!(allowed.check_url_static("http://127.0.0.1:9/"), Ok(()));
        assert_eq!(allowed.check_url_static("http://localhost:9/"), Ok(()));
        assert!(allowed.check_url_static("http://10.0.0.1/").is_err());
    }
}
