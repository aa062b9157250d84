//! A wscluster node as a child process.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::{free_port, signal, strip_ansi};

/// Where a node's log lines go.
#[derive(Clone, Debug)]
pub enum NodeLog {
    /// Kept in memory (a test's nodes: printed if the test fails).
    Memory,
    /// Written to this file (long runs: the bench's nodes).
    File(PathBuf),
}

enum Sink {
    Memory(String),
    File(std::fs::File, PathBuf),
}

/// A `wscluster` node: a child process of a built binary listening on a
/// port of 127.0.0.1 chosen by the launcher, stdout and stderr captured line
/// by line (colours stripped). On drop: SIGCONT (it may have been stopped),
/// SIGKILL, reaped; its log printed first if the thread is panicking (a
/// failed test).
pub struct NodeProcess {
    pub name: String,
    child: Child,
    sink: Arc<Mutex<Sink>>,
    addr: String,
}

/// Attempts at a port before giving up (another process may take a free
/// port between its choice and the node's bind).
const PORT_ATTEMPTS: usize = 5;

impl NodeProcess {
    /// Start `bin args…` with `--listen 127.0.0.1:<a free port>` added,
    /// `NO_COLOR=1` and `env`, its log to `log`, and wait (up to `timeout`)
    /// until it answers `GET /healthz`. A node that could not bind its port
    /// (taken meanwhile) is started again on another; any other early exit
    /// is an error carrying its log.
    pub fn launch(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: NodeLog,
        timeout: Duration,
    ) -> Result<NodeProcess> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = format!("127.0.0.1:{}", free_port().context("free port")?);
            let mut all = vec!["--listen".to_owned(), addr.clone()];
            all.extend(args.iter().cloned());
            let mut p = Self::spawn(bin, name, &all, env, log.clone(), addr)?;
            match p.wait_healthy(timeout) {
                Ok(()) => return Ok(p),
                Err(e) if attempt < PORT_ATTEMPTS && p.lost_its_port() => {
                    drop(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: NodeLog,
        addr: String,
    ) -> Result<NodeProcess> {
        let sink = match log {
            NodeLog::Memory => Sink::Memory(String::new()),
            NodeLog::File(path) => Sink::File(
                std::fs::File::create(&path)
                    .with_context(|| format!("create {}", path.display()))?,
                path,
            ),
        };
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let sink = Arc::new(Mutex::new(sink));
        let pipes: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for pipe in pipes {
            let sink = sink.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    if let Ok(mut s) = sink.lock() {
                        match &mut *s {
                            Sink::Memory(text) => {
                                text.push_str(&line);
                                text.push('\n');
                            }
                            Sink::File(f, _) => {
                                let _ = writeln!(f, "{line}");
                            }
                        }
                    }
                }
            });
        }
        Ok(NodeProcess {
            name: name.to_owned(),
            child,
            sink,
            addr,
        })
    }

    /// Its listen address (`host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Wait until it answers `/healthz` with 200; an error with its log if
    /// it exited first or did not within `timeout`.
    fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Exited first: whatever answers on the port is not this node.
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_none() && healthz_ok(&self.addr) {
                return Ok(());
            }
            if exited.is_some() || Instant::now() > deadline {
                // The reader threads may still hold the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let how = match exited {
                    Some(st) => format!("exited ({st})"),
                    None => format!("not answering /healthz after {timeout:?}"),
                };
                bail!(
                    "node {} did not start on {}: {how}:\n{}",
                    self.name,
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// It exited because its port was taken.
    fn lost_its_port(&mut self) -> bool {
        self.try_exit().is_some() && self.log().contains("Address already in use")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send it signal `sig` (`libc::SIGSTOP`, `libc::SIGTERM`, …).
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// SIGKILL it and reap it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait (polling, without blocking the runtime) for it to exit; its
    /// status code (None: not within `timeout`, or killed by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        let Ok(s) = self.sink.lock() else {
            return String::new();
        };
        match &*s {
            Sink::Memory(text) => text.clone(),
            Sink::File(_, path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- node {} log ----\n{}", self.name, self.log());
        }
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /healthz` on `addr` answers 200 (a short blocking check).
fn healthz_ok(addr: &str) -> bool {
    let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    head[..n].starts_with(b"HTTP/1.1 200")
}
