//! Configuration: flags and `WSC_*` environment variables (contract §2).
//!
//! [`Config::from_args`] refuses bad settings with one line that names the
//! setting, so `main` can print it and exit non-zero.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Why a configuration was refused. Each message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Flags that do not parse (clap's own message names the flag).
    #[error("{0}")]
    Flags(String),
    #[error("--redis-url (WSC_REDIS_URL): {0}")]
    RedisUrl(String),
    #[error(
        "--lease-ttl-ms (WSC_LEASE_TTL_MS) must be greater than 2 x --heartbeat-ms (WSC_HEARTBEAT_MS): {lease} <= 2 x {heartbeat}"
    )]
    Lease { lease: u64, heartbeat: u64 },
    #[error("--heartbeat-ms (WSC_HEARTBEAT_MS) must be at least 10")]
    Heartbeat,
    #[error(
        "--jwt-secret (WSC_JWT_SECRET) or --jwt-public-key (WSC_JWT_PUBLIC_KEY) is required unless --dev is set"
    )]
    NoSecret,
    #[error("--jwt-public-key (WSC_JWT_PUBLIC_KEY): {0}")]
    PublicKey(String),
    #[error("--send-shards (WSC_SEND_SHARDS) must be between 1 and 1024")]
    Shards,
    #[error(
        "--redis-url (WSC_REDIS_URL) holds several comma-separated URLs: that is a Redis Cluster seed list, so set --redis-cluster (WSC_REDIS_CLUSTER=true)"
    )]
    SeedList,
    #[error(
        "--redis-cluster (WSC_REDIS_CLUSTER) needs --redis-url (WSC_REDIS_URL) with the seed nodes"
    )]
    ClusterNoUrl,
    #[error(
        "--prefix (WSC_PREFIX) must be non-empty and must not contain '{{' or '}}' (they are Redis Cluster hash tags)"
    )]
    Prefix,
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("--history-size (WSC_HISTORY_SIZE) must be at most 10000")]
    HistorySize,
    #[error("--worker-threads (WSC_WORKER_THREADS) must be at most 1024")]
    WorkerThreads,
    #[error("--log-format (WSC_LOG_FORMAT) must be text or json")]
    LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "wscluster",
    version,
    about = "An elastic WebSocket cluster: nodes self-assign ids, route through Redis streams and reap each other."
)]
pub struct Args {
    /// Redis URL (redis:// or rediss://). Unset: standalone node with an in-process bus.
    #[arg(long, env = "WSC_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Address for WebSocket, HTTP API and ops.
    #[arg(long, env = "WSC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// The URL is a comma list of Redis Cluster seed nodes.
    #[arg(long, env = "WSC_REDIS_CLUSTER", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub redis_cluster: bool,
    /// Redis key prefix.
    #[arg(long, env = "WSC_PREFIX", default_value = "wsc")]
    pub prefix: String,
    /// Number of send streams, each with its own router.
    #[arg(long, env = "WSC_SEND_SHARDS", default_value_t = 1)]
    pub send_shards: u32,
    /// Lease renewal period.
    #[arg(long, env = "WSC_HEARTBEAT_MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// A node whose lease is this old is dead; must be > 2 x heartbeat.
    #[arg(long, env = "WSC_LEASE_TTL_MS", default_value_t = 5000)]
    pub lease_ttl_ms: u64,
    /// HS256 key for client tokens; required unless --dev.
    #[arg(long, env = "WSC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Bearer key for POST /api/send; unset: that endpoint answers 404.
    #[arg(long, env = "WSC_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Offline messages kept per user (oldest dropped first).
    #[arg(long, env = "WSC_MAILBOX_MAX", default_value_t = 1000)]
    pub mailbox_max: u64,
    /// Offline messages expire after this many seconds.
    #[arg(long, env = "WSC_MAILBOX_TTL_S", default_value_t = 86400)]
    pub mailbox_ttl_s: u64,
    /// Payload bytes kept per user's mailbox (oldest dropped first).
    #[arg(long, env = "WSC_MAILBOX_MAX_BYTES", default_value_t = 8_388_608)]
    pub mailbox_max_bytes: u64,
    /// Messages kept per user for resume (contract §9); 0 turns history off.
    #[arg(long, env = "WSC_HISTORY_SIZE", default_value_t = 200)]
    pub history_size: u64,
    /// A user's history expires this long after its last message.
    #[arg(long, env = "WSC_HISTORY_TTL_S", default_value_t = 300)]
    pub history_ttl_s: u64,
    /// How long an `idem` key is remembered (contract §4).
    #[arg(long, env = "WSC_IDEMPOTENCY_TTL_S", default_value_t = 600)]
    pub idempotency_ttl_s: u64,
    /// Newest entries kept in `<p>:events` (contract §10).
    #[arg(long, env = "WSC_EVENTS_MAX", default_value_t = 100_000)]
    pub events_max: u64,
    /// Runtime worker threads; 0: one per CPU the process may use.
    #[arg(long, env = "WSC_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Largest client message (uncompressed).
    #[arg(long, env = "WSC_MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,
    /// Largest payload in the send stream; larger goes to `<p>:dead`.
    #[arg(long, env = "WSC_MAX_PAYLOAD_BYTES", default_value_t = 65536)]
    pub max_payload_bytes: usize,
    /// Per connection, token bucket with a burst of twice this.
    #[arg(long, env = "WSC_MAX_MSGS_PER_SEC", default_value_t = 100)]
    pub max_msgs_per_sec: u32,
    /// Clock skew allowed on exp/nbf.
    #[arg(long, env = "WSC_JWT_LEEWAY_S", default_value_t = 30)]
    pub jwt_leeway_s: u64,
    /// On SIGTERM, close sockets in jittered batches over this window.
    #[arg(long, env = "WSC_DRAIN_MS", default_value_t = 5000)]
    pub drain_ms: u64,
    /// PEM file: RS256/ES256 tokens instead of HS256.
    #[arg(long, env = "WSC_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `aud` claim.
    #[arg(long, env = "WSC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim.
    #[arg(long, env = "WSC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Comma list of allowed Origin headers, or `*`.
    #[arg(long, env = "WSC_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Connections per node; over it, 503 before the upgrade.
    #[arg(long, env = "WSC_MAX_CONNECTIONS", default_value_t = 50000)]
    pub max_connections: usize,
    /// Connections per user over the cluster; over it, 429.
    #[arg(long, env = "WSC_MAX_CONNS_PER_USER", default_value_t = 16)]
    pub max_conns_per_user: usize,
    /// Subscriptions per connection.
    #[arg(long, env = "WSC_MAX_TOPICS_PER_CONN", default_value_t = 64)]
    pub max_topics_per_conn: usize,
    /// Development mode: ?user=NAME without a token, demo page at /.
    #[arg(long, env = "WSC_DEV", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub dev: bool,
    /// Serve the demo page at `/` and the client library at `/client.js`
    /// (for a cluster behind a load balancer). Logging in with a bare user
    /// name (`?user=`) still needs `--dev`; without it the page asks for a token.
    #[arg(long, env = "WSC_DEMO", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub demo: bool,
    /// `text` or `json`.
    #[arg(long, env = "WSC_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// Origins allowed to open a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Any origin (`*`, or unset with `--dev`).
    Any,
    /// Only these (unset without `--dev`: none, so any `Origin` gets 403).
    List(Vec<String>),
}

/// How client tokens are verified.
#[derive(Clone)]
pub enum JwtKey {
    Hs256(Vec<u8>),
    /// PEM contents of an RSA or EC public key.
    PublicPem(Vec<u8>),
    /// `--dev` without any key: only `?user=` works.
    None,
}

impl std::fmt::Debug for JwtKey {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtKey::Hs256(_) => f.write_str("Hs256(<redacted>)"),
            JwtKey::PublicPem(_) => f.write_str("PublicPem(..)"),
            JwtKey::None => f.write_str("None"),
        }
    }
}

/// The validated configuration of a node.
#[derive(Clone)]
pub struct Config {
    pub redis_url: Option<String>,
    /// `redis_url` is a comma list of Redis Cluster seed nodes.
    pub redis_cluster: bool,
    pub listen: String,
    pub prefix: String,
    pub send_shards: u32,
    pub heartbeat: Duration,
    pub lease_ttl: Duration,
    pub jwt_key: JwtKey,
    pub api_key: Option<String>,
    pub mailbox_max: u64,
    pub mailbox_ttl: Duration,
    pub mailbox_max_bytes: u64,
    pub history_size: u64,
    pub history_ttl: Duration,
    pub idempotency_ttl: Duration,
    pub events_max: u64,
    /// Runtime worker threads (None: one per CPU). Fewer wake-ups hop
    /// between threads with fewer: on a small machine one costs less CPU
    /// per message (BENCHMARKS.md).
    pub worker_threads: Option<usize>,
    pub max_frame_bytes: usize,
    pub max_payload_bytes: usize,
    pub max_msgs_per_sec: u32,
    pub jwt_leeway_s: u64,
    pub drain: Duration,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub origins: Origins,
    pub max_connections: usize,
    pub max_conns_per_user: usize,
    pub max_topics_per_conn: usize,
    pub dev: bool,
    /// Serve the demo page at `/` (also implied by `--dev`).
    pub demo: bool,
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("redis", &self.redis_url.as_deref().map(redact_url))
            .field("redis_cluster", &self.redis_cluster)
            .field("listen", &self.listen)
            .field("prefix", &self.prefix)
            .field("send_shards", &self.send_shards)
            .field("heartbeat", &self.heartbeat)
            .field("lease_ttl", &self.lease_ttl)
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

/// A Redis URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    // A seed list is redacted URL by URL.
    split_urls(url)
        .iter()
        .map(|one| match url::Url::parse(one) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            }
            Err(_) => "<unparsable>".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The URLs of a `--redis-url` value: one, or a comma list of seeds.
pub fn split_urls(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    let parsed = url::Url::parse(url).map_err(|e| ConfigError::RedisUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(ConfigError::RedisUrl(format!(
            "scheme must be redis:// or rediss://, not {}://",
            parsed.scheme()
        )));
    }
    redis::Client::open(url).map_err(|e| ConfigError::RedisUrl(e.to_string()))?;
    Ok(())
}

impl Config {
    /// Parse flags and environment, then validate.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        match &args.redis_url {
            Some(url) => {
                let urls = split_urls(url);
                if urls.len() > 1 && !args.redis_cluster {
                    return Err(ConfigError::SeedList);
                }
                if urls.is_empty() {
                    return Err(ConfigError::RedisUrl("no URL given".into()));
                }
                for u in &urls {
                    check_redis_url(u)?;
                }
            }
            None if args.redis_cluster => return Err(ConfigError::ClusterNoUrl),
            None => {}
        }
        if args.prefix.is_empty() || args.prefix.contains(['{', '}']) {
            return Err(ConfigError::Prefix);
        }
        if args.heartbeat_ms < 10 {
            return Err(ConfigError::Heartbeat);
        }
        if args.lease_ttl_ms <= 2 * args.heartbeat_ms {
            return Err(ConfigError::Lease {
                lease: args.lease_ttl_ms,
                heartbeat: args.heartbeat_ms,
            });
        }
        if args.send_shards == 0 || args.send_shards > 1024 {
            return Err(ConfigError::Shards);
        }
        // A resume replays up to this many messages in one reply.
        if args.history_size > 10_000 {
            return Err(ConfigError::HistorySize);
        }
        if args.worker_threads > 1024 {
            return Err(ConfigError::WorkerThreads);
        }
        for (name, v) in [
            ("mailbox-max (WSC_MAILBOX_MAX)", args.mailbox_max as usize),
            (
                "mailbox-max-bytes (WSC_MAILBOX_MAX_BYTES)",
                args.mailbox_max_bytes as usize,
            ),
            (
                "mailbox-ttl-s (WSC_MAILBOX_TTL_S)",
                args.mailbox_ttl_s as usize,
            ),
            (
                "history-ttl-s (WSC_HISTORY_TTL_S)",
                args.history_ttl_s as usize,
            ),
            (
                "idempotency-ttl-s (WSC_IDEMPOTENCY_TTL_S)",
                args.idempotency_ttl_s as usize,
            ),
            ("events-max (WSC_EVENTS_MAX)", args.events_max as usize),
            (
                "max-frame-bytes (WSC_MAX_FRAME_BYTES)",
                args.max_frame_bytes,
            ),
            (
                "max-payload-bytes (WSC_MAX_PAYLOAD_BYTES)",
                args.max_payload_bytes,
            ),
            (
                "max-msgs-per-sec (WSC_MAX_MSGS_PER_SEC)",
                args.max_msgs_per_sec as usize,
            ),
            (
                "max-connections (WSC_MAX_CONNECTIONS)",
                args.max_connections,
            ),
            (
                "max-conns-per-user (WSC_MAX_CONNS_PER_USER)",
                args.max_conns_per_user,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        let jwt_key = match (&args.jwt_public_key, &args.jwt_secret) {
            (Some(path), _) => {
                let pem = std::fs::read(path)
                    .map_err(|e| ConfigError::PublicKey(format!("{}: {e}", path.display())))?;
                // Checked here, before anything starts: a bad key is bad
                // configuration (one line, exit 2), not a failed start.
                let usable = jsonwebtoken::DecodingKey::from_rsa_pem(&pem).is_ok()
                    || jsonwebtoken::DecodingKey::from_ec_pem(&pem).is_ok();
                if !usable {
                    return Err(ConfigError::PublicKey(format!(
                        "{}: not an RSA or EC public key in PEM form",
                        path.display()
                    )));
                }
                JwtKey::PublicPem(pem)
            }
            (None, Some(s)) if !s.is_empty() => JwtKey::Hs256(s.as_bytes().to_vec()),
            _ if args.dev => JwtKey::None,
            _ => return Err(ConfigError::NoSecret),
        };
        let origins = match args.allowed_origins.as_deref().map(str::trim) {
            Some("*") => Origins::Any,
            Some(list) => Origins::List(
                list.split(',')
                    .map(|s| s.trim().trim_end_matches('/').to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
            ),
            None if args.dev => Origins::Any,
            None => Origins::List(Vec::new()),
        };
        let log_format = match args.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(ConfigError::LogFormat),
        };
        Ok(Config {
            redis_url: args.redis_url,
            redis_cluster: args.redis_cluster,
            listen: args.listen,
            prefix: args.prefix,
            send_shards: args.send_shards,
            heartbeat: Duration::from_millis(args.heartbeat_ms),
            lease_ttl: Duration::from_millis(args.lease_ttl_ms),
            jwt_key,
            api_key: args.api_key.filter(|k| !k.is_empty()),
            mailbox_max: args.mailbox_max,
            mailbox_ttl: Duration::from_secs(args.mailbox_ttl_s),
            mailbox_max_bytes: args.mailbox_max_bytes,
            history_size: args.history_size,
            history_ttl: Duration::from_secs(args.history_ttl_s),
            idempotency_ttl: Duration::from_secs(args.idempotency_ttl_s),
            events_max: args.events_max,
            worker_threads: (args.worker_threads > 0).then_some(args.worker_threads),
            max_frame_bytes: args.max_frame_bytes,
            max_payload_bytes: args.max_payload_bytes,
            max_msgs_per_sec: args.max_msgs_per_sec,
            jwt_leeway_s: args.jwt_leeway_s,
            drain: Duration::from_millis(args.drain_ms),
            jwt_audience: args.jwt_audience,
            jwt_issuer: args.jwt_issuer,
            origins,
            max_connections: args.max_connections,
            max_conns_per_user: args.max_conns_per_user,
            max_topics_per_conn: args.max_topics_per_conn,
            dev: args.dev,
            demo: args.demo,
            log_format,
        })
    }

    /// Parse from an argument list (the first item is the program name).
    pub fn try_parse_from<I, T>(it: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = Args::try_parse_from(it).map_err(|e| ConfigError::Flags(e.to_string()))?;
        Config::from_args(args)
    }

    /// The listen address as a socket address.
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["wscluster"];
        v.extend_from_slice(args);
        Config::try_parse_from(v).map_err(|e| e.to_string())
    }

    #[test]
    fn dev_needs_no_secret() {
        let c = parse(&["--dev"]).unwrap();
        assert!(matches!(c.jwt_key, JwtKey::None));
        assert_eq!(c.origins, Origins::Any);
    }

    #[test]
    fn refusals_name_the_setting() {
        assert!(parse(&[]).unwrap_err().contains("--jwt-secret"));
        let e = parse(&["--dev", "--lease-ttl-ms", "2000", "--heartbeat-ms", "1000"]).unwrap_err();
        assert!(e.contains("--lease-ttl-ms"), "{e}");
        let e = parse(&["--dev", "--redis-url", "http://x"]).unwrap_err();
        assert!(e.contains("--redis-url"), "{e}");
        let e = parse(&["--dev", "--redis-url", "not a url"]).unwrap_err();
        assert!(e.contains("--redis-url"), "{e}");
        let e = parse(&["--dev", "--redis-url", "redis://a:1,redis://b:2"]).unwrap_err();
        assert!(e.contains("--redis-cluster"), "{e}");
        let e = parse(&["--dev", "--redis-cluster"]).unwrap_err();
        assert!(e.contains("--redis-url"), "{e}");
        let e = parse(&[
            "--dev",
            "--redis-cluster",
            "--redis-url",
            "redis://a:1,http://b",
        ])
        .unwrap_err();
        assert!(e.contains("--redis-url"), "{e}");
        let e = parse(&["--dev", "--prefix", "a{b"]).unwrap_err();
        assert!(e.contains("--prefix"), "{e}");
        let c = parse(&[
            "--dev",
            "--redis-cluster",
            "--redis-url",
            "redis://a:1, redis://b:2",
        ])
        .unwrap();
        assert!(c.redis_cluster);
        assert_eq!(split_urls(c.redis_url.as_deref().unwrap()).len(), 2);
        let e = parse(&["--dev", "--log-format", "xml"]).unwrap_err();
        assert!(e.contains("--log-format"), "{e}");
        let e = parse(&["--dev", "--worker-threads", "5000"]).unwrap_err();
        assert!(e.contains("--worker-threads"), "{e}");
        assert_eq!(parse(&["--dev"]).unwrap().worker_threads, None);
        let c = parse(&["--dev", "--worker-threads", "1"]).unwrap();
        assert_eq!(c.worker_threads, Some(1));
    }

    #[test]
    fn origins_without_dev_are_closed() {
        let c = parse(&["--jwt-secret", "s"]).unwrap();
        assert_eq!(c.origins, Origins::List(vec![]));
        let c = parse(&[
            "--jwt-secret",
            "s",
            "--allowed-origins",
            "https://a.com, https://b.com/",
        ])
        .unwrap();
        assert_eq!(
            c.origins,
            Origins::List(vec!["https://a.com".into(), "https://b.com".into()])
        );
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_url("redis://:pw@h:1/"), "redis://:***@h:1/");
        assert_eq!(
            redact_url("redis://:pw@h:1/,redis://:pw@g:2/"),
            "redis://:***@h:1/,redis://:***@g:2/"
        );
        assert!(!format!("{:?}", JwtKey::Hs256(b"topsecret".to_vec())).contains("topsecret"));
    }
}
