//! The careful operator on top of `Api`: retries what is safe to retry (with backoff and
//! jitter), waits for every task a write starts, checks before repeating a create or a start
//! whether the first attempt went through after all, and counts the writes it sends.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::api::{encode_segment, random_u64, Api, Method};
use super::error::PveError;

/// How transient failures are retried.
#[derive(Clone, Debug)]
pub struct Retry {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The pause before the second try; it doubles each time (plus up to half again of jitter).
    pub base: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            base: Duration::from_millis(500),
            max: Duration::from_secs(8),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub retry: Retry,
    /// First pause between two looks at a running task; it grows by half up to `poll_max`.
    pub poll: Duration,
    pub poll_max: Duration,
    /// Longest wait for one task.
    pub task_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retry: Retry::default(),
            poll: Duration::from_millis(200),
            poll_max: Duration::from_secs(2),
            task_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// A guest as `/cluster/resources` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guest {
    pub vmid: u32,
    /// `lxc` or `qemu`.
    pub kind: String,
    pub node: String,
    pub name: String,
    pub status: String,
    /// Lowercase, as PVE stores them.
    pub tags: Vec<String>,
    pub lock: Option<String>,
    pub template: bool,
}

/// A file on a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub volid: String,
    pub size: u64,
    pub ctime: u64,
    pub format: String,
}

/// The PVE API client: thread-safe, shared by the workers of one run.
pub struct Client {
    api: Arc<dyn Api>,
    opts: ClientOptions,
    writes: AtomicUsize,
    journal: Mutex<Vec<String>>,
    started: Instant,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.api.endpoint())
            .field("writes", &self.writes())
            .finish_non_exhaustive()
    }
}

fn num(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The node, type and id in a UPID (`UPID:node:pid:pstart:start:type:id:user:`).
fn upid_parts(upid: &str) -> Option<(&str, &str, &str)> {
    let mut it = upid.split(':');
    if it.next()? != "UPID" {
        return None;
    }
    let node = it.next()?;
    let kind = it.nth(3)?;
    let id = it.next()?;
    Some((node, kind, id))
}

enum Settled {
    Gone,
    Present(Map<String, Value>),
}

impl Client {
    pub fn new(api: Arc<dyn Api>, opts: ClientOptions) -> Client {
        Client {
            api,
            opts,
            writes: AtomicUsize::new(0),
            journal: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    pub fn endpoint(&self) -> &str {
        self.api.endpoint()
    }

    /// Write requests sent so far (retries included).
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::Relaxed)
    }

    /// What the client did, one line per write, task and retry: for the step's log.
    pub fn journal(&self) -> Vec<String> {
        self.journal.lock().map(|j| j.clone()).unwrap_or_default()
    }

    fn note(&self, line: String) {
        if let Ok(mut j) = self.journal.lock() {
            j.push(format!(
                "[{:>7.2}s] {line}",
                self.started.elapsed().as_secs_f64()
            ));
        }
    }

    fn pause(&self, attempt: u32) -> Duration {
        let r = &self.opts.retry;
        let exp = r
            .base
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(r.max);
        let jitter_ms = (exp.as_millis() as u64 / 2).max(1);
        exp + Duration::from_millis(random_u64() % jitter_ms)
    }

    /// Runs `f` until it succeeds, fails permanently or runs out of attempts. Before each
    /// repeat, `done` may say that the earlier attempt took effect after all.
    fn retrying<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> Result<T, PveError>,
        mut done: impl FnMut() -> Result<Option<T>, PveError>,
    ) -> Result<T, PveError> {
        let attempts = self.opts.retry.attempts.max(1);
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < attempts => {
                    let pause = self.pause(attempt);
                    self.note(format!(
                        "{what}: attempt {attempt} failed ({e}); retrying in {:.1}s",
                        pause.as_secs_f64()
                    ));
                    std::thread::sleep(pause);
                    attempt += 1;
                    if let Some(v) = done()? {
                        self.note(format!("{what}: the earlier attempt went through"));
                        return Ok(v);
                    }
                }
                Err(e) if attempt > 1 && e.is_transient() => {
                    self.note(format!("{what}: giving up after {attempt} attempts: {e}"));
                    return Err(PveError::GaveUp {
                        attempts: attempt,
                        source: Box::new(e),
                    });
                }
                Err(e) => {
                    self.note(format!("{what}: failed: {e}"));
                    return Err(e);
                }
            }
        }
    }

    /// A read, retried on transient failures.
    pub fn get(&self, path: &str, params: &[(String, String)]) -> Result<Value, PveError> {
        self.retrying(
            &format!("GET {path}"),
            || self.api.call(Method::Get, path, params),
            || Ok(None),
        )
    }

    /// One write request, not retried; a UPID it answers with is waited for. For writes whose
    /// callers decide themselves whether a repeat is safe (snapshots, backups).
    pub fn write(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError> {
        self.write_once(method, path, params)
    }

    /// Adds a line to the journal (the step's log).
    pub fn log(&self, line: String) {
        self.note(line);
    }

    /// One write request, not retried; a UPID it answers with is waited for.
    fn write_once(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let keys: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
        self.note(format!("{} {path} [{}]", method.as_str(), keys.join(",")));
        let data = self.api.call(method, path, params)?;
        if let Some(upid) = data.as_str().filter(|s| s.starts_with("UPID:")) {
            self.wait_task(upid)?;
        }
        Ok(data)
    }

    /// Waits for a task to stop; an exit status other than OK (or PVE's `WARNINGS: n`) is an
    /// error carrying PVE's message and the last lines of the task log.
    pub fn wait_task(&self, upid: &str) -> Result<(), PveError> {
        let (node, kind, id) = upid_parts(upid).ok_or_else(|| PveError::Protocol {
            method: "GET".into(),
            path: "/nodes/…/tasks".into(),
            message: format!("`{upid}` is not a UPID"),
        })?;
        let base = format!("/nodes/{node}/tasks/{}", encode_segment(upid));
        let started = Instant::now();
        let mut pause = self.opts.poll;
        loop {
            let status = self.get(&format!("{base}/status"), &[])?;
            if status.get("status").and_then(Value::as_str) == Some("stopped") {
                let exit = status
                    .get("exitstatus")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string();
                self.note(format!(
                    "task {kind} {id} on {node}: {exit} after {:.1}s",
                    started.elapsed().as_secs_f64()
                ));
                if exit == "OK" || exit.starts_with("WARNINGS") {
                    return Ok(());
                }
                let log = self.task_log(&base);
                return Err(PveError::Task {
                    node: node.into(),
                    upid: upid.into(),
                    kind: kind.into(),
                    exitstatus: exit,
                    log,
                });
            }
            if started.elapsed() >= self.opts.task_timeout {
                return Err(PveError::TaskTimeout {
                    node: node.into(),
                    upid: upid.into(),
                    kind: kind.into(),
                    secs: started.elapsed().as_secs(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 3 / 2).min(self.opts.poll_max);
        }
    }

    /// The last lines of a task's log (empty if it cannot be read).
    fn task_log(&self, base: &str) -> Vec<String> {
        let params = [
            ("start".to_string(), "0".to_string()),
            ("limit".to_string(), "5000".to_string()),
        ];
        let Ok(Value::Array(lines)) = self.get(&format!("{base}/log"), &params) else {
            return Vec::new();
        };
        let all: Vec<String> = lines
            .iter()
            .filter_map(|l| l.get("t").and_then(Value::as_str).map(str::to_string))
            .collect();
        all[all.len().saturating_sub(8)..].to_vec()
    }

    // ------------------------------------------------------------------ reads

    /// PVE's version (a cheap authenticated call: checks the credentials and the TLS set-up).
    pub fn version(&self) -> Result<Value, PveError> {
        self.get("/version", &[])
    }

    /// Every guest of the cluster, containers and VMs.
    pub fn guests(&self) -> Result<Vec<Guest>, PveError> {
        let data = self.get("/cluster/resources", &[("type".into(), "vm".into())])?;
        let items = data.as_array().ok_or_else(|| PveError::Protocol {
            method: "GET".into(),
            path: "/cluster/resources".into(),
            message: "not a list".into(),
        })?;
        let mut out = Vec::new();
        for item in items {
            let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
            if kind != "lxc" && kind != "qemu" {
                continue;
            }
            let Some(vmid) = item.get("vmid").and_then(num) else {
                continue;
            };
            let s = |k: &str| {
                item.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            out.push(Guest {
                vmid: vmid as u32,
                kind: kind.into(),
                node: s("node"),
                name: s("name"),
                status: s("status"),
                tags: split_tags(&s("tags")),
                lock: item
                    .get("lock")
                    .and_then(Value::as_str)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
                template: item.get("template").and_then(num) == Some(1),
            });
        }
        out.sort_by_key(|g| g.vmid);
        Ok(out)
    }

    /// A container's configuration (pending values applied, as PVE shows it), or `None` when
    /// there is no such container on that node.
    pub fn ct_config(&self, node: &str, vmid: u32) -> Result<Option<Map<String, Value>>, PveError> {
        match self.get(&format!("/nodes/{node}/lxc/{vmid}/config"), &[]) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(_) => Err(PveError::Protocol {
                method: "GET".into(),
                path: format!("/nodes/{node}/lxc/{vmid}/config"),
                message: "not an object".into(),
            }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A container's status (`running`, `stopped`), or `None` if it does not exist.
    pub fn ct_status(&self, node: &str, vmid: u32) -> Result<Option<String>, PveError> {
        match self.get(&format!("/nodes/{node}/lxc/{vmid}/status/current"), &[]) {
            Ok(v) => Ok(Some(
                v.get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
            )),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Config keys changed on a running container that wait for its next restart.
    pub fn ct_pending_keys(&self, node: &str, vmid: u32) -> Result<Vec<String>, PveError> {
        let data = self.get(&format!("/nodes/{node}/lxc/{vmid}/pending"), &[])?;
        Ok(data
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|i| i.get("pending").is_some() || i.get("delete").is_some())
                    .filter_map(|i| i.get("key").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits while a container is locked by a create in progress (after a lost answer, the
    /// task may still be running), then says whether it is there.
    fn settle(&self, node: &str, vmid: u32) -> Result<Settled, PveError> {
        let started = Instant::now();
        let mut pause = self.opts.poll;
        loop {
            match self.ct_config(node, vmid)? {
                None => return Ok(Settled::Gone),
                Some(c) if c.get("lock").and_then(Value::as_str) == Some("create") => {
                    if started.elapsed() >= self.opts.task_timeout {
                        return Ok(Settled::Present(c));
                    }
                }
                Some(c) => return Ok(Settled::Present(c)),
            }
            std::thread::sleep(pause);
            pause = (pause * 3 / 2).min(self.opts.poll_max);
        }
    }

    // ----------------------------------------------------------------- writes

    /// Creates a container and waits for the task. A transient failure is retried, but only
    /// after checking that the container was not created anyway (an answer lost on the way
    /// back): if it exists and `ours` recognises it, the create is done.
    pub fn create_ct(
        &self,
        node: &str,
        vmid: u32,
        params: &[(String, String)],
        ours: &dyn Fn(&Map<String, Value>) -> bool,
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/lxc");
        let mut all = vec![("vmid".to_string(), vmid.to_string())];
        all.extend(params.iter().cloned());
        self.retrying(
            &format!("create CT {vmid}"),
            || self.write_once(Method::Post, &path, &all).map(|_| ()),
            || match self.settle(node, vmid)? {
                Settled::Gone => Ok(None),
                Settled::Present(c) if ours(&c) => Ok(Some(())),
                Settled::Present(_) => Err(PveError::Api {
                    status: 500,
                    method: "POST".into(),
                    path: path.clone(),
                    message: format!(
                        "CT {vmid} appeared on node {node} during the retry, but it is not NixMox's (its tags do not name the project)"
                    ),
                }),
            },
        )
    }

    /// Sets config keys (`delete` removes keys). Repeating the same PUT is harmless, so it is
    /// retried, also when another task holds the config lock.
    pub fn update_ct(
        &self,
        node: &str,
        vmid: u32,
        params: &[(String, String)],
        delete: &[String],
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/lxc/{vmid}/config");
        let mut all = params.to_vec();
        if !delete.is_empty() {
            all.push(("delete".into(), delete.join(",")));
        }
        self.retrying(
            &format!("update CT {vmid}"),
            || self.write_once(Method::Put, &path, &all).map(|_| ()),
            || Ok(None),
        )
    }

    /// Grows a container volume to `size` (like `8G`); growing to the size it has is a no-op
    /// for PVE, so this is retried too.
    pub fn resize_ct(&self, node: &str, vmid: u32, disk: &str, size: &str) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/lxc/{vmid}/resize");
        let params = [
            ("disk".to_string(), disk.to_string()),
            ("size".to_string(), size.to_string()),
        ];
        self.retrying(
            &format!("resize CT {vmid}"),
            || self.write_once(Method::Put, &path, &params).map(|_| ()),
            || Ok(None),
        )
    }

    /// Starts a container and waits until the start task ends. Before a retry, a container
    /// found running counts as started.
    pub fn start_ct(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/lxc/{vmid}/status/start");
        self.retrying(
            &format!("start CT {vmid}"),
            || match self.write_once(Method::Post, &path, &[]) {
                Err(e)
                    if e.pve_message()
                        .is_some_and(|m| m.contains("already running")) =>
                {
                    Ok(())
                }
                r => r.map(|_| ()),
            },
            || Ok((self.ct_status(node, vmid)?.as_deref() == Some("running")).then_some(())),
        )
    }

    /// Migrates a container to `target` and waits: restart mode when it runs (PVE has no live
    /// migration of containers). Before a retry, a container found on `target` counts as
    /// migrated.
    pub fn migrate_ct(
        &self,
        node: &str,
        vmid: u32,
        target: &str,
        running: bool,
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/lxc/{vmid}/migrate");
        let mut params = vec![("target".to_string(), target.to_string())];
        if running {
            params.push(("restart".to_string(), "1".to_string()));
        }
        self.retrying(
            &format!("migrate CT {vmid} to {target}"),
            || self.write_once(Method::Post, &path, &params).map(|_| ()),
            || {
                Ok(self
                    .guests()?
                    .iter()
                    .any(|g| g.vmid == vmid && g.node == target)
                    .then_some(()))
            },
        )
    }

    /// The cluster's nodes (`GET /nodes`): name, online, memory (MiB) and cores.
    pub fn nodes(&self) -> Result<Vec<nixmox_core::ClusterNode>, PveError> {
        let data = self.get("/nodes", &[])?;
        let items = data.as_array().ok_or_else(|| PveError::Protocol {
            method: "GET".into(),
            path: "/nodes".into(),
            message: "not a list".into(),
        })?;
        let mut out: Vec<nixmox_core::ClusterNode> = items
            .iter()
            .filter_map(|item| {
                let name = item.get("node").and_then(Value::as_str)?.to_string();
                Some(nixmox_core::ClusterNode {
                    online: item.get("status").and_then(Value::as_str) == Some("online"),
                    memory: item.get("maxmem").and_then(num).map(|b| b >> 20),
                    cores: item.get("maxcpu").and_then(num).map(|c| c as u32),
                    name,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Stops a container (hard stop) and waits.
    pub fn stop_ct(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/lxc/{vmid}/status/stop");
        self.retrying(
            &format!("stop CT {vmid}"),
            || match self.write_once(Method::Post, &path, &[]) {
                Err(e) if e.pve_message().is_some_and(|m| m.contains("not running")) => Ok(()),
                r => r.map(|_| ()),
            },
            || Ok((self.ct_status(node, vmid)?.as_deref() != Some("running")).then_some(())),
        )
    }

    /// Destroys a container with its volumes (stopping it first if it runs).
    pub fn destroy_ct(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        match self.ct_status(node, vmid)? {
            None => return Ok(()),
            Some(s) if s == "running" => self.stop_ct(node, vmid)?,
            Some(_) => {}
        }
        let path = format!("/nodes/{node}/lxc/{vmid}");
        let params = [
            ("purge".to_string(), "1".to_string()),
            ("destroy-unreferenced-disks".to_string(), "1".to_string()),
        ];
        self.retrying(
            &format!("destroy CT {vmid}"),
            || self.write_once(Method::Delete, &path, &params).map(|_| ()),
            || Ok(self.ct_config(node, vmid)?.is_none().then_some(())),
        )
    }

    // ---------------------------------------------------------------- storage

    /// The volumes of one content type (`vztmpl`, `iso`, …) on a storage of a node.
    pub fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: &str,
    ) -> Result<Vec<Volume>, PveError> {
        let path = format!("/nodes/{node}/storage/{}/content", encode_segment(storage));
        let data = self.get(&path, &[("content".into(), content.into())])?;
        let mut out: Vec<Volume> = data
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| {
                        Some(Volume {
                            volid: i.get("volid")?.as_str()?.to_string(),
                            size: i.get("size").and_then(num).unwrap_or(0),
                            ctime: i.get("ctime").and_then(num).unwrap_or(0),
                            format: i
                                .get("format")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.volid.cmp(&b.volid));
        Ok(out)
    }

    /// Uploads a file as `content` (`vztmpl`) to a storage and waits for PVE to copy it into
    /// place. Not retried: a failed upload is reported and can be started again.
    pub fn upload(
        &self,
        node: &str,
        storage: &str,
        content: &str,
        file: &Path,
        name: &str,
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/storage/{}/upload", encode_segment(storage));
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.note(format!("POST {path} [content,filename] {name}"));
        let data = self
            .api
            .upload(&path, &[("content".into(), content.into())], file, name)?;
        if let Some(upid) = data.as_str().filter(|s| s.starts_with("UPID:")) {
            self.wait_task(upid)?;
        }
        Ok(())
    }
}

/// PVE's tag list (`a;b c,d`) as lowercase tags, sorted, without duplicates.
pub fn split_tags(s: &str) -> Vec<String> {
    let mut tags: Vec<String> = s
        .split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// An `Api` that answers from a script and records the requests.
    struct Script {
        answers: Mutex<VecDeque<(String, Result<Value, PveError>)>>,
        seen: Mutex<Vec<String>>,
    }

    impl Script {
        fn new(answers: Vec<(&str, Result<Value, PveError>)>) -> Arc<Script> {
            Arc::new(Script {
                answers: Mutex::new(
                    answers
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                ),
                seen: Mutex::new(Vec::new()),
            })
        }
    }

    impl Api for Script {
        fn call(
            &self,
            method: Method,
            path: &str,
            _: &[(String, String)],
        ) -> Result<Value, PveError> {
            let req = format!("{} {path}", method.as_str());
            self.seen.lock().unwrap().push(req.clone());
            let (want, answer) = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected request {req}"));
            assert!(req.starts_with(&want), "expected {want}, got {req}");
            answer
        }
        fn upload(
            &self,
            _: &str,
            _: &[(String, String)],
            _: &Path,
            _: &str,
        ) -> Result<Value, PveError> {
            unreachable!()
        }
        fn endpoint(&self) -> &str {
            "https://test:8006"
        }
    }

    fn quick() -> ClientOptions {
        ClientOptions {
            retry: Retry {
                attempts: 3,
                base: Duration::from_millis(1),
                max: Duration::from_millis(2),
            },
            poll: Duration::from_millis(1),
            poll_max: Duration::from_millis(2),
            task_timeout: Duration::from_secs(5),
        }
    }

    fn err500(m: &str) -> PveError {
        PveError::Api {
            status: 500,
            method: "X".into(),
            path: "/x".into(),
            message: m.into(),
        }
    }

    const UPID: &str = "UPID:pve1:00001:00002:00003:vzcreate:901:root@pam!nixmox:";

    #[test]
    fn upids_are_read() {
        assert_eq!(upid_parts(UPID), Some(("pve1", "vzcreate", "901")));
        assert_eq!(upid_parts("nope"), None);
    }

    #[test]
    fn a_create_whose_answer_was_lost_is_not_sent_again() {
        let script = Script::new(vec![
            (
                "POST /nodes/pve1/lxc",
                Err(PveError::Connect {
                    url: "u".into(),
                    message: "reset".into(),
                }),
            ),
            (
                "GET /nodes/pve1/lxc/901/config",
                Ok(serde_json::json!({"lock": "create"})),
            ),
            (
                "GET /nodes/pve1/lxc/901/config",
                Ok(serde_json::json!({"tags": "nixmox;p"})),
            ),
        ]);
        let c = Client::new(script.clone(), quick());
        c.create_ct("pve1", 901, &[], &|cfg| cfg.get("tags").is_some())
            .unwrap();
        assert_eq!(c.writes(), 1);
    }

    #[test]
    fn a_failed_create_is_retried_when_nothing_was_created() {
        let script = Script::new(vec![
            ("POST /nodes/pve1/lxc", Err(err500("injected"))),
            (
                "GET /nodes/pve1/lxc/901/config",
                Err(err500(
                    "Configuration file 'nodes/pve1/lxc/901.conf' does not exist",
                )),
            ),
            ("POST /nodes/pve1/lxc", Ok(Value::String(UPID.into()))),
            (
                "GET /nodes/pve1/tasks/UPID%3Apve1",
                Ok(serde_json::json!({"status": "running"})),
            ),
            (
                "GET /nodes/pve1/tasks/UPID%3Apve1",
                Ok(serde_json::json!({"status": "stopped", "exitstatus": "OK"})),
            ),
        ]);
        let c = Client::new(script.clone(), quick());
        c.create_ct("pve1", 901, &[], &|_| true).unwrap();
        assert_eq!(c.writes(), 2);
    }

    #[test]
    fn a_failed_task_carries_message_and_log() {
        let script = Script::new(vec![
            (
                "POST /nodes/pve1/lxc/901/status/start",
                Ok(Value::String(UPID.replace("vzcreate", "vzstart"))),
            ),
            (
                "GET /nodes/pve1/tasks/",
                Ok(serde_json::json!({"status": "stopped", "exitstatus": "boom"})),
            ),
            (
                "GET /nodes/pve1/tasks/",
                Ok(
                    serde_json::json!([{"n": 1, "t": "starting"}, {"n": 2, "t": "boom"}, {"n": 3, "t": "TASK ERROR: boom"}]),
                ),
            ),
        ]);
        let c = Client::new(script, quick());
        let e = c.start_ct("pve1", 901).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vzstart task on pve1 failed: boom (task log: starting)"
        );
    }

    #[test]
    fn permanent_errors_are_not_retried_and_transient_ones_give_up() {
        let script = Script::new(vec![(
            "PUT /nodes/pve1/lxc/901/config",
            Err(PveError::Auth {
                endpoint: "e".into(),
                message: "authentication failure".into(),
                hint: "h".into(),
            }),
        )]);
        let c = Client::new(script, quick());
        assert!(matches!(
            c.update_ct("pve1", 901, &[], &[]).unwrap_err(),
            PveError::Auth { .. }
        ));

        let lock = "can't lock file '/run/lock/lxc/pve-config-901.lock' - got timeout";
        let script = Script::new(vec![
            ("PUT /nodes/pve1/lxc/901/config", Err(err500(lock))),
            ("PUT /nodes/pve1/lxc/901/config", Err(err500(lock))),
            ("PUT /nodes/pve1/lxc/901/config", Err(err500(lock))),
        ]);
        let c = Client::new(script, quick());
        let e = c.update_ct("pve1", 901, &[], &[]).unwrap_err();
        assert!(matches!(e, PveError::GaveUp { attempts: 3, .. }), "{e}");
        assert!(e.is_lock_timeout());
        assert_eq!(c.writes(), 3);
    }

    #[test]
    fn tags_are_normalised() {
        assert_eq!(
            split_tags("Nixmox;homelab core,,x"),
            vec!["core", "homelab", "nixmox", "x"]
        );
        assert!(split_tags("").is_empty());
    }
}
