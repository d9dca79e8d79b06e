//! `caching-proxy`: gratify's HTTP cache in front of any HTTP/1.1 origin.
//!
//! ```text
//! caching-proxy --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8080
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use gratify::cache::HttpCacheConfig;
use gratify_examples::proxy;

/// A caching reverse proxy with RFC 9111 shared-cache semantics.
#[derive(Debug, Parser)]
#[command(name = "caching-proxy", version, about)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// The origin, as http://host:port.
    #[arg(long)]
    upstream: String,
    /// The memory budget in MiB.
    #[arg(long, default_value_t = 256)]
    max_mib: u64,
    /// Close idle upstream connections after this many milliseconds (keep
    /// it below the origin's keep-alive timeout).
    #[arg(long, default_value_t = 4000)]
    upstream_idle_ms: u64,
    /// Store nothing without explicit freshness: no heuristic freshness
    /// from `Last-Modified` (a proxy in front of origins it does not control
    /// uses it by default, as Squid and Traffic Server do).
    #[arg(long)]
    no_heuristic: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    gratify_examples::init_logs("info");
    let args = Args::parse();
    let upstream = match proxy::parse_upstream(&args.upstream) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("caching-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match proxy::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("caching-proxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let mut config = HttpCacheConfig::default();
    config.max_bytes = args.max_mib.saturating_mul(1024 * 1024);
    config.rules.heuristic = !args.no_heuristic;
    let mut options = proxy::ProxyOptions::default();
    options.upstream_idle = std::time::Duration::from_millis(args.upstream_idle_ms);
    eprintln!("caching-proxy: {} -> {upstream}", args.listen);
    // On Ctrl-C or SIGTERM: stop accepting, let each connection finish
    // the request it holds (at most 10 s), say what was left.
    match proxy::serve_until(
        listener,
        upstream,
        config,
        options,
        gratify_examples::shutdown_signal(),
    )
    .await
    {
        Ok(stopped) => {
            eprintln!(
                "caching-proxy: stopped; {} connection(s) open at the signal, {} cut at the 10 s deadline",
                stopped.open, stopped.cut
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("caching-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
