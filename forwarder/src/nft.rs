//! Running nftables: the `nft` program for one-off transactions and listings, and a
//! `Session` that keeps one libnftables context for the process's life for the transactions
//! that must be quick (a change to one Service in kernel mode).
//!
//! The `nft` program costs a process per transaction, and more than that when the
//! transaction deleted something: when its netlink socket closes, nf_tables waits for the
//! work that frees what the transaction deleted, an RCU grace period (about 8 ms here), and
//! `nft` exits only then. A context kept open runs a transaction on a socket that stays
//! open: 0.3 ms for a change of elements against 15–35 ms through the program (2026-12-04,
//! 4,000 frontends in the table). libnftables is what `nft` itself is built on; it is
//! loaded at run time (`dlopen`), so the forwarder has no build-time dependency on it, and
//! where it cannot be loaded a session runs the program instead.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::process::Stdio;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::warn;

use crate::kernel::KernelError;

/// How long one transaction may take: a hung `nft` must not freeze VIP handover.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(5);

/// The library `nft` is built on, by its soname.
const LIBRARY: &CStr = c"libnftables.so.1";

/// Runs `script` as one transaction through the `nft` program.
pub async fn run(script: &str) -> Result<(), KernelError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    // On a timeout the child is dropped, which kills it.
    let out = tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .map_err(|_| KernelError::TimedOut(NFT_TIMEOUT))??;
    if out.status.success() {
        Ok(())
    } else {
        Err(KernelError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// What `nft <args>` prints (`None` when it fails, e.g. for a table that does not exist).
pub async fn list(args: &[&str]) -> Option<String> {
    let listed = Command::new("nft")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(NFT_TIMEOUT, listed).await {
        Ok(Ok(out)) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        _ => None,
    }
}

/// Transactions on one libnftables context, opened at the first and kept; the `nft`
/// program where the library cannot be loaded.
#[derive(Debug, Default)]
pub struct Session {
    state: State,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Unopened,
    Open(Arc<Mutex<Context>>),
    /// The library cannot be loaded here: every transaction runs the program.
    Program,
}

impl Session {
    /// A session that loads `library` rather than libnftables (for tests of the fallback).
    #[cfg(test)]
    fn loading(library: &CStr) -> Session {
        Session {
            state: match Context::open(library) {
                Ok(context) => State::Open(Arc::new(Mutex::new(context))),
                Err(_) => State::Program,
            },
        }
    }

    /// Whether transactions run on a kept context (not the program).
    pub fn kept(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Runs `script` as one transaction. A transaction that does not finish within
    /// `NFT_TIMEOUT` is left to its thread and the next one opens a new context.
    pub async fn run(&mut self, script: &str) -> Result<(), KernelError> {
        if let State::Unopened = self.state {
            self.state = match Context::open(LIBRARY) {
                Ok(context) => State::Open(Arc::new(Mutex::new(context))),
                Err(why) => {
                    warn!(%why, "libnftables cannot be loaded: each change runs the nft program");
                    State::Program
                }
            };
        }
        let State::Open(context) = &self.state else {
            return run(script).await;
        };
        let context = Arc::clone(context);
        let script = CString::new(script)
            .map_err(|_| KernelError::Refused("a NUL byte in the ruleset".to_string()))?;
        let job = tokio::task::spawn_blocking(move || match context.lock() {
            Ok(mut context) => context.run(&script),
            Err(_) => Err(KernelError::Refused(
                "an earlier transaction on this libnftables context failed midway".to_string(),
            )),
        });
        match tokio::time::timeout(NFT_TIMEOUT, job).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => {
                self.state = State::Unopened;
                Err(KernelError::Refused(format!("libnftables: {join}")))
            }
            Err(_) => {
                self.state = State::Unopened;
                Err(KernelError::TimedOut(NFT_TIMEOUT))
            }
        }
    }
}

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// One `struct nft_ctx` and the library functions that use it.
struct Context {
    ctx: NonNull<c_void>,
    free: CtxFree,
    run: RunCmd,
    errors: CtxGetBuffer,
    output: CtxGetBuffer,
}

// The context is used by one thread at a time (it lives behind a Mutex) and libnftables
// keeps no state tied to the thread that made it.
unsafe impl Send for Context {}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("libnftables context")
    }
}

impl Context {
    fn open(library: &CStr) -> Result<Context, String> {
        // The library stays loaded for the process's life: no dlclose.
        let handle = unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(format!("cannot load {}", library.to_string_lossy()));
        }
        let symbol = |name: &CStr| {
            let found = unsafe { libc::dlsym(handle, name.as_ptr()) };
            NonNull::new(found).ok_or_else(|| format!("no {} in it", name.to_string_lossy()))
        };
        // Each symbol has the C signature of libnftables.h that its type names.
        let new: CtxNew = unsafe { std::mem::transmute(symbol(c"nft_ctx_new")?.as_ptr()) };
        let free: CtxFree = unsafe { std::mem::transmute(symbol(c"nft_ctx_free")?.as_ptr()) };
        let buffer_output: CtxBuffer =
            unsafe { std::mem::transmute(symbol(c"nft_ctx_buffer_output")?.as_ptr()) };
        let buffer_error: CtxBuffer =
            unsafe { std::mem::transmute(symbol(c"nft_ctx_buffer_error")?.as_ptr()) };
        let output: CtxGetBuffer =
            unsafe { std::mem::transmute(symbol(c"nft_ctx_get_output_buffer")?.as_ptr()) };
        let errors: CtxGetBuffer =
            unsafe { std::mem::transmute(symbol(c"nft_ctx_get_error_buffer")?.as_ptr()) };
        let run: RunCmd =
            unsafe { std::mem::transmute(symbol(c"nft_run_cmd_from_buffer")?.as_ptr()) };
        // NFT_CTX_DEFAULT.
        let ctx = NonNull::new(unsafe { new(0) }).ok_or("nft_ctx_new failed")?;
        let context = Context {
            ctx,
            free,
            run,
            errors,
            output,
        };
        // What nft would print goes to buffers of the context, not to the forwarder's
        // standard output and error.
        if unsafe { buffer_output(ctx.as_ptr()) } != 0 || unsafe { buffer_error(ctx.as_ptr()) } != 0
        {
            return Err("cannot buffer libnftables' output".to_string());
        }
        Ok(context)
    }

    fn run(&mut self, script: &CStr) -> Result<(), KernelError> {
        let ctx = self.ctx.as_ptr();
        let status = unsafe { (self.run)(ctx, script.as_ptr()) };
        // Reading a buffer empties it for the next transaction.
        let text = |get: CtxGetBuffer| {
            let at = unsafe { get(ctx) };
            if at.is_null() {
                String::new()
            } else {
                unsafe { CStr::from_ptr(at) }
                    .to_string_lossy()
                    .trim()
                    .to_string()
            }
        };
        let _ = text(self.output);
        let errors = text(self.errors);
        if status == 0 {
            Ok(())
        } else {
            Err(KernelError::Refused(errors))
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        unsafe { (self.free)(self.ctx.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `test` on a thread of its own in a new network namespace (its nftables apart
    /// from the host's), with a runtime whose threads are made there too; `false` where
    /// namespaces cannot be made (not root).
    fn in_netns<F, Fut>(test: F) -> bool
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        std::thread::spawn(move || {
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: cannot make a network namespace");
                return false;
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(test());
            true
        })
        .join()
        .unwrap()
    }

    const TABLE: &str = "table inet t {\n\tmap m {\n\t\ttype ipv4_addr : ipv4_addr\n\t}\n}\n";

    #[test]
    fn a_kept_context_commits_reports_refusals_and_goes_on() {
        in_netns(|| async {
            let mut session = Session::default();
            session.run(TABLE).await.unwrap();
            if !session.kept() {
                eprintln!("skipped: no libnftables here");
                return;
            }
            for _ in 0..3 {
                session
                    .run("add element inet t m { 192.0.2.1 : 10.0.0.1 }\n")
                    .await
                    .unwrap();
                session
                    .run("delete element inet t m { 192.0.2.1 }\n")
                    .await
                    .unwrap();
            }
            // Refused with nft's own words, and nothing of the transaction applied.
            let err = session
                .run("add element inet t m { 192.0.2.2 : 10.0.0.2 }\ndelete element inet t m { 192.0.2.9 }\n")
                .await
                .unwrap_err();
            assert!(
                matches!(&err, KernelError::Refused(why) if why.contains("No such file or directory")),
                "{err}"
            );
            let listed = list(&["list", "map", "inet", "t", "m"]).await.unwrap();
            assert!(!listed.contains("192.0.2.2"), "{listed}");
            // The next transaction is not troubled by the last one's errors.
            session
                .run("add element inet t m { 192.0.2.3 : 10.0.0.3 }\n")
                .await
                .unwrap();
            let listed = list(&["list", "map", "inet", "t", "m"]).await.unwrap();
            assert!(listed.contains("192.0.2.3 : 10.0.0.3"), "{listed}");
        });
    }

    #[test]
    fn without_the_library_the_program_runs_the_transaction() {
        in_netns(|| async {
            let mut session = Session::loading(c"libnftables-absent.so.0");
            assert!(!session.kept());
            session.run(TABLE).await.unwrap();
            session
                .run("add element inet t m { 192.0.2.1 : 10.0.0.1 }\n")
                .await
                .unwrap();
            let err = session.run("delete element inet t m { 192.0.2.9 }\n").await;
            assert!(matches!(err, Err(KernelError::Refused(_))), "{err:?}");
            let listed = list(&["list", "map", "inet", "t", "m"]).await.unwrap();
            assert!(listed.contains("192.0.2.1 : 10.0.0.1"), "{listed}");
        });
    }
}
