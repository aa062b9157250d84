//! A wscluster node as a child process.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::{signal, strip_ansi};

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

/// A `wscluster` node: a child process of a built binary, stdout and
/// stderr captured line by line (colours stripped), its listen address
/// read from its log. On drop: SIGCONT (it may have been stopped), SIGKILL,
/// reaped; its log printed first if the thread is panicking (a failed test).
pub struct NodeProcess {
    pub name: String,
    child: Child,
    sink: Arc<Mutex<Sink>>,
    addr: Arc<Mutex<Option<String>>>,
}

/// The address in a node's "listening" log line: `listen=ADDR` (text
/// logs) or `"listen":"ADDR"` (JSON logs).
pub fn listen_addr(line: &str) -> Option<String> {
    if let Some(rest) = line.split("listen=").nth(1) {
        return rest.split_whitespace().next().map(str::to_owned);
    }
    let rest = line.split("\"listen\":\"").nth(1)?;
    rest.split('"').next().map(str::to_owned)
}

impl NodeProcess {
    /// Spawn `bin args…` with `NO_COLOR=1` and `env`, its log to `log`;
    /// returns at once ([`NodeProcess::wait_addr`] waits until it listens).
    pub fn spawn(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: NodeLog,
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
        let addr = Arc::new(Mutex::new(None::<String>));
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
            let (sink, addr) = (sink.clone(), addr.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    if let Ok(mut a) = addr.lock()
                        && a.is_none()
                    {
                        *a = listen_addr(&line);
                    }
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

    /// Spawn it and wait (up to `timeout`) until it listens.
    pub fn start(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: NodeLog,
        timeout: Duration,
    ) -> Result<NodeProcess> {
        let mut p = Self::spawn(bin, name, args, env, log)?;
        p.wait_addr(timeout)?;
        Ok(p)
    }

    /// Its listen address (`host:port`), once it has logged it.
    pub fn addr(&self) -> Option<String> {
        self.addr.lock().ok().and_then(|a| a.clone())
    }

    /// Wait until it has logged its listen address; an error with its log
    /// if it exited first or did not within `timeout`.
    pub fn wait_addr(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.addr() {
                return Ok(a);
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                // The reader threads may still hold the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let how = match exited {
                    Some(st) => format!("exited ({st})"),
                    None => format!("not listening after {timeout:?}"),
                };
                bail!("node {} did not start: {how}:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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
