//! Plugin start-up: a cold start from the on-disk cache (a plugin's first attempt after a
//! restart) and a warm attempt (fresh store + instantiate + a trivial `run`).
//!
//! `scripts/build-plugins && cargo bench -p uet --bench plugin_start`
//!
//! To profile one plugin's warm attempts, `UET_BENCH_ONLY=pygreet` (or `jsgreet`, or `hostile`)
//! times that plugin alone, `UET_BENCH_ATTEMPTS` sets how many, and `UET_CACHE_DIR` keeps the
//! compiled plugins between runs, so that a profile is not all compile:
//! `UET_CACHE_DIR=/tmp/c UET_BENCH_ONLY=pygreet UET_BENCH_ATTEMPTS=5000 perf record -g ...`

use std::path::Path;
use std::time::{Duration, Instant};

use uet::adapters::wasm::{Grants, Limits, Runtime, WasmOutcome};

fn main() {
    let plugin =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/plugin/hostile.wasm");
    assert!(
        plugin.exists(),
        "build the plugins first: scripts/build-plugins"
    );
    let only = std::env::var("UET_BENCH_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let attempts = |default: usize| {
        std::env::var("UET_BENCH_ATTEMPTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let temp = tempfile::tempdir().unwrap();
    let cache = match std::env::var_os("UET_CACHE_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => {
            std::fs::create_dir_all(&dir).unwrap();
            std::path::PathBuf::from(dir)
        }
        None => temp.path().to_path_buf(),
    };
    let work = tempfile::tempdir().unwrap();
    let grants = Grants {
        workstream: work.path().to_path_buf(),
        read: vec![],
        write: vec![],
        pinned: None,
        // as every attempt of a run after its first with the plugin
        check_file: false,
    };
    let limits = Limits::default();
    let input = r#"{"mode": "noop"}"#;
    let attempt = |rt: &Runtime| {
        let r = rt.run(&plugin, input, &grants, &limits, || false, None);
        assert_eq!(r.outcome, WasmOutcome::Output("{}".into()));
    };

    if wanted("hostile") {
        small(&attempt, &cache, attempts(20_000));
    }

    // the large components: the example plugins in Python and JavaScript, when built
    // (`examples/plugins/*/build.sh`, or the test command, puts them in target/examples)
    for name in ["pygreet", "jsgreet"] {
        if !wanted(name) {
            continue;
        }
        let plugin =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/examples/{name}.wasm"));
        if !plugin.exists() {
            println!("{name}: not built (examples/plugins/*/build.sh), skipped");
            continue;
        }
        let mb = std::fs::metadata(&plugin).map_or(0, |m| m.len()) >> 20;
        let rt = Runtime::new(Some(cache.clone()), 64 << 20).unwrap();
        let limits = Limits {
            memory: Some(64 << 20),
            ..Limits::default()
        };
        let attempt = || {
            let r = rt.run(
                &plugin,
                r#"{"name": "uet"}"#,
                &grants,
                &limits,
                || false,
                None,
            );
            assert!(
                matches!(r.outcome, WasmOutcome::Output(_)),
                "{:?}",
                r.outcome
            );
        };
        let t = Instant::now();
        attempt();
        println!(
            "{name} ({mb} MB): first attempt (compiles and caches unless UET_CACHE_DIR has it): {:.0} ms",
            ms(t.elapsed())
        );
        let mut warm = timed(attempts(500), attempt);
        report(&format!("{name}: warm attempt"), &mut warm);
    }
}

/// The small plugin: its compile, cold starts from the cache and warm attempts.
fn small(attempt: &dyn Fn(&Runtime), cache: &Path, n: usize) {
    let t = Instant::now();
    attempt(&Runtime::new(Some(cache.to_path_buf()), 0).unwrap());
    println!(
        "first attempt (compiles and caches unless UET_CACHE_DIR has it): {:.1} ms",
        ms(t.elapsed())
    );

    let mut engine = Vec::new();
    let mut cold = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let rt = Runtime::new(Some(cache.to_path_buf()), 0).unwrap();
        engine.push(t.elapsed());
        let t = Instant::now();
        attempt(&rt);
        cold.push(t.elapsed());
    }
    report(
        "runtime start (engine, pool, linker; once per process)",
        &mut engine,
    );
    report(
        "cold start from the cache (load + first attempt)",
        &mut cold,
    );

    let rt = Runtime::new(Some(cache.to_path_buf()), 0).unwrap();
    attempt(&rt);
    let mut warm = timed(n, || attempt(&rt));
    report(
        "warm attempt (store + instantiate + trivial run)",
        &mut warm,
    );
}

/// Each of `n` calls' time.
fn timed(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{what}: median {:.1} µs, p10 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs ({} samples)",
        at(0.5).as_secs_f64() * 1e6,
        at(0.1).as_secs_f64() * 1e6,
        at(0.9).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}
