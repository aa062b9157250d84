//! The `wscluster` binary: parse the configuration, start a node, leave on
//! SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use wscluster::config::{Args, Config, LogFormat};
use wscluster::{Node, shutdown};

/// jemalloc rather than glibc's malloc: malloc/free were ~17 % of a
/// node's CPU at everyday rates (issue 16's profile); see BENCHMARKS.md.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // rediss:// uses rustls; pick its crypto provider once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Bad configuration is one line naming the setting (contract §2);
    // clap's own report adds a usage tip on lines of their own.
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!(
                "wscluster: {}{}",
                first.trim_start_matches("error: "),
                env_of(&e)
                    .map(|v| format!(" (from {v} if set)"))
                    .unwrap_or_default()
            );
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wscluster: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match cfg.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cfg.worker_threads {
        rt.worker_threads(n);
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wscluster: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wscluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The environment variable of the setting a clap error is about: a bad
/// value may have come from there, not from the command line.
fn env_of(e: &clap::Error) -> Option<String> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.trim_start_matches("--").split([' ', '=']).next()?;
    let cmd = Args::command();
    let a = cmd.get_arguments().find(|a| a.get_long() == Some(long))?;
    Some(a.get_env()?.to_string_lossy().into_owned())
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    tracing::info!(config = ?cfg, "wscluster {}", env!("CARGO_PKG_VERSION"));
    let node = Node::build(cfg).await?;
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        shutdown::signal().await;
        tracing::info!("signal received: leaving");
        c.cancel();
    });
    node.run(cancel).await?;
    Ok(())
}
