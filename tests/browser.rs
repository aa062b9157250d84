//! The demo page, `/client.js` and `/admin` in headless Chromium (issue 7):
//! redis + three nodes + `wsc-lb` in front, driven by
//! `tests/browser/cluster.test.mjs` (playwright-core). Two pages exchange
//! messages; the node of one is SIGKILLed in the middle of a burst of
//! messages to it; the page reconnects through the LB by itself, resumes
//! (`since`/`epoch`, answered `recovered: true`) and shows each message of
//! the burst once, in seq order; `/admin` shows the node go. Then the page
//! goes offline: briefly, and a reload resumes from sessionStorage with
//! `recovered: true`; then for longer than `--history-size` messages, and
//! the resume answers `recovered: false` (the mailbox is still shown).
//! Then the app closes the other page's connection (`POST
//! /api/disconnect`, code 4003), and that page does not reconnect.
//! Last, tokens: a page signs its own short-lived HS256 tokens (WebCrypto,
//! with the nodes' secret; the nodes run with `--jwt-leeway-s 0`): the
//! client refreshes them on its open connection (no reconnect in 15 s, two
//! or more `refreshed`); a refresh with another user's token is refused
//! (`forbidden`) and the server closes with 4001 at the old expiry; and a
//! `welcome` without `epoch` (a previous release's node) makes the client
//! drop its resume position; an app's 4001 (`POST /api/disconnect`) is
//! final even for a client with `getToken`; a page reloaded with `persist`
//! drops a redelivery of a message the old page showed; and no page logs a
//! console error while it loads and connects.
//! Screenshots land in `target/browser-test/`.
//!
//! Needs `/usr/bin/chromium` (or `$CHROMIUM`) and
//! `tests/browser/node_modules` (`npm install` there); `scripts/test.sh`
//! installs both.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `--history-size` of the nodes: small, so that step 9 of the script (a
/// page offline for more messages than the history keeps) is quick.
const HISTORY_SIZE: &str = "50";

/// `--jwt-leeway-s` of the nodes: none, so that a token is over at its
/// `exp` (steps 11 and 12 of the script time refreshes and the 4001 close
/// against it). Pages with `?user=` (`--dev`) have no expiry.
const JWT_LEEWAY_S: &str = "0";

struct Lb(std::process::Child);

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `wsc-lb` on a free port in front of `backends`; its address.
/// It is the bench package's binary, which this package's tests do not
/// get built: cargo builds it (or finds it up to date) into this test's
/// target directory and profile.
fn start_lb(backends: &[String]) -> (Lb, String) {
    let lb = wscluster_testkit::workspace_bin(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "wscluster-bench",
        "wsc-lb",
        Path::new(env!("CARGO_BIN_EXE_wscluster")),
    )
    .unwrap_or_else(|e| panic!("wsc-lb: {e:#}"));
    let mut child = Command::new(lb)
        .arg("127.0.0.1:0")
        .args(backends)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wsc-lb");
    let out = child.stdout.take().expect("lb stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("lb line");
    let addr = line
        .trim()
        .strip_prefix("wsc-lb listening on ")
        .unwrap_or_else(|| panic!("unexpected wsc-lb output: {line:?}"))
        .to_owned();
    (Lb(child), addr)
}

fn prerequisites(dir: &Path) -> PathBuf {
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(
        chromium.exists(),
        "browser test: {} not found; install it with `apt-get install -y chromium` \
         (scripts/test.sh does), or set CHROMIUM",
        chromium.display()
    );
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "browser test: {}/node_modules is missing; run `npm install --no-audit --no-fund` there \
         (scripts/test.sh does)",
        dir.display()
    );
    assert!(
        Command::new("node").arg("--version").output().is_ok(),
        "browser test: `node` not found"
    );
    chromium
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_reconnect_dedupe_and_admin() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/browser");
    let chromium = prerequisites(&dir);
    let out = root.join("target/browser-test");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("output dir");

    let (_redis, nodes) = cluster_with(
        3,
        &[
            "--history-size",
            HISTORY_SIZE,
            "--jwt-leeway-s",
            JWT_LEEWAY_S,
        ],
    )
    .await;
    let mut list = Vec::new();
    for n in &nodes {
        list.push(serde_json::json!({"id": n.node_id().await, "addr": n.addr, "pid": n.pid()}));
    }
    let backends: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let (_lb, lb_addr) = start_lb(&backends);

    let mut script = Command::new("node")
        .arg("cluster.test.mjs")
        .current_dir(&dir)
        .env("LB_URL", format!("http://{lb_addr}"))
        .env("NODES", serde_json::Value::from(list).to_string())
        .env("API_KEY", API_KEY)
        .env("HISTORY", HISTORY_SIZE)
        .env("SECRET", SECRET)
        .env("OUT_DIR", &out)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn node");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = script.try_wait().expect("wait node") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = script.kill();
            panic!("browser test script did not finish within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "browser test script failed ({status}); screenshots in {}",
        out.display()
    );
    let shots = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
    assert!(
        shots >= 5,
        "expected a screenshot per step in {}",
        out.display()
    );
}
