//! A run's own thread for its plugin attempts that run one at a time, as a chain's do.
//!
//! Handed to the runtime's blocking pool, such an attempt woke a sleeping thread, and its end
//! woke the sleeping driver: two wake-ups per step, each of them as dear as a small plugin's
//! whole attempt on a small VM, where waking an idle CPU goes through the hypervisor (see
//! PERFORMANCE.md). Here neither side sleeps between the steps of a chain: the relay thread
//! waits for its next attempt by spinning a moment before it sleeps, and the driver waits for
//! the attempt's end the same way. Each spin is bounded, so a slow plugin or a pause between
//! steps costs a fraction of a millisecond of CPU, not a busy core.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How long the relay thread spins for its next attempt before it sleeps: a chain's driver
/// hands the next step on some 100 µs after the last one ended.
const NEXT_WITHIN: Duration = Duration::from_micros(300);

/// How long the driver spins for an attempt's end before it awaits it, when the last attempt
/// ended within it; otherwise it awaits at once, the plugin being one that takes its time. A
/// small plugin's attempt takes some 20–200 µs here, some of it in caches filled on the other
/// CPU, and a spin cut shorter missed often enough to cost more than it saved.
const END_WITHIN: Duration = Duration::from_millis(1);

type Job = Box<dyn FnOnce() + Send>;

/// The thread; it ends when the relay is dropped.
pub(super) struct Relay {
    jobs: mpsc::Sender<Job>,
    /// The last attempt outlasted [`END_WITHIN`], from its hand-over to its end.
    slow: AtomicBool,
}

impl Relay {
    /// Starts the thread. It enters `runtime` as the runtime's own blocking threads do, so a
    /// plugin's WASI calls find the same runtime there.
    pub(super) fn start(runtime: tokio::runtime::Handle) -> std::io::Result<Relay> {
        let (jobs, next) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("uet-relay".into())
            .spawn(move || {
                let _in = runtime.enter();
                while let Some(job) = next_job(&next) {
                    job();
                }
            })?;
        Ok(Relay {
            jobs,
            slow: AtomicBool::new(false),
        })
    }

    /// Runs `f` on the relay thread and gives its result, or the panic that ended it.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (done, mut end) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
        });
        self.jobs
            .send(job)
            .map_err(|_| "the relay thread is gone".to_string())?;
        let began = Instant::now();
        let within = if self.slow.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            END_WITHIN
        };
        let ended = loop {
            match end.try_recv() {
                Ok(ended) => break Some(ended),
                Err(oneshot::error::TryRecvError::Empty) if began.elapsed() < within => {
                    std::hint::spin_loop()
                }
                Err(oneshot::error::TryRecvError::Empty) => break (&mut end).await.ok(),
                Err(oneshot::error::TryRecvError::Closed) => break None,
            }
        };
        self.slow
            .store(began.elapsed() >= END_WITHIN, Ordering::Relaxed);
        match ended {
            Some(Ok(t)) => Ok(t),
            Some(Err(panic)) => Err(crate::panic_message(&*panic)),
            None => Err("the relay thread is gone".into()),
        }
    }
}

/// The relay thread's next attempt: spun for up to [`NEXT_WITHIN`], then slept for; none once
/// the relay is dropped.
fn next_job(next: &mpsc::Receiver<Job>) -> Option<Job> {
    let began = Instant::now();
    loop {
        match next.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if began.elapsed() < NEXT_WITHIN => {
                std::hint::spin_loop()
            }
            Err(mpsc::TryRecvError::Empty) => return next.recv().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_relay_thread_and_a_panic_is_an_answer() {
        let relay = Relay::start(tokio::runtime::Handle::current()).unwrap();
        let name = || std::thread::current().name().map(String::from);
        assert_eq!(relay.run(name).await.unwrap().as_deref(), Some("uet-relay"));
        // one that ends after both spins gave up: the relay slept, and so did the driver
        let slow = relay.run(|| {
            std::thread::sleep(Duration::from_millis(20));
            7
        });
        assert_eq!(slow.await, Ok(7));
        let panicked = relay.run(|| -> u32 { panic!("a host bug") }).await;
        assert_eq!(panicked, Err("a host bug".into()));
        // the thread lives on after it
        assert_eq!(relay.run(|| 1 + 1).await, Ok(2));
        assert!(tokio::runtime::Handle::try_current().is_ok());
        assert!(
            relay
                .run(|| tokio::runtime::Handle::try_current().is_ok())
                .await
                .unwrap()
        );
    }

    #[test]
    fn the_thread_ends_with_its_relay() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let relay = Relay::start(rt.handle().clone()).unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        rt.block_on(relay.run(move || {
            // SAFETY: gettid has no arguments and cannot fail
            tid_tx.send(unsafe { libc::gettid() }).unwrap()
        }))
        .unwrap();
        let tid = tid_rx.recv().unwrap();
        let task = format!("/proc/self/task/{tid}");
        assert!(std::path::Path::new(&task).exists());
        drop(relay);
        let began = Instant::now();
        while std::path::Path::new(&task).exists() {
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "the relay thread lived on"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
