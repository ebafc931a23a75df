//! What the fuzz tests (`tests/fuzz_*.rs`) share: a seeded generator and the bounds of a
//! run. `cargo test` runs each fuzzer with its fixed seed and number of cases; by hand,
//! `QOMVM_FUZZ_SEED=N` changes the seed and `QOMVM_FUZZ_ITERATIONS=N` the number of cases
//! (`0`: for ever, until a case fails or the run is interrupted); `QOMVM_FUZZ_FIRST_CASE=N`
//! starts at case N.

/// xorshift64*: small, fast and the same sequence on every host for a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (0 is mapped to a non-zero state).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// An "interesting" integer: boundaries more often than chance would give them.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => 1 << self.below(64),
            4 => (1 << self.below(64)) - 1,
            5 => u64::from(u32::MAX),
            6 => self.below(4096),
            _ => self.next_u64(),
        }
    }

    /// `data` with a few random byte-level mutations: flips, replacements with boundary
    /// bytes, insertions, deletions, truncation, duplicated slices.
    pub fn mutate(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        for _ in 0..=self.below(4) {
            let len = out.len();
            match self.below(7) {
                0 if len > 0 => {
                    let i = self.below(len as u64) as usize;
                    out[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len as u64) as usize;
                    out[i] = *self.pick(&[0, 0xff, 0x7f, 0x80, b',', b'=', b'"', b'{', b'}']);
                }
                2 => {
                    let i = self.below(len as u64 + 1) as usize;
                    let b = self.next_u64() as u8;
                    out.insert(i, b);
                }
                3 if len > 0 => {
                    let i = self.below(len as u64) as usize;
                    out.remove(i);
                }
                4 if len > 0 => {
                    let i = self.below(len as u64) as usize;
                    out.truncate(i);
                }
                5 if len > 0 => {
                    let a = self.below(len as u64) as usize;
                    let b = a + self.below((len - a) as u64 + 1) as usize;
                    let slice = out[a..b].to_vec();
                    let at = self.below(out.len() as u64 + 1) as usize;
                    out.splice(at..at, slice);
                }
                _ if len >= 4 => {
                    // An aligned 32-bit word replaced by an interesting value.
                    let i = self.below(len as u64 / 4) as usize * 4;
                    let v = self.interesting_u64() as u32;
                    out[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
                _ => {}
            }
        }
        out
    }
}

/// The bounds of one fuzzer's run, from the environment or the fuzzer's defaults.
#[derive(Clone, Copy, Debug)]
pub struct FuzzRun {
    pub seed: u64,
    /// `None`: for ever.
    pub iterations: Option<u64>,
    /// The first case (`QOMVM_FUZZ_FIRST_CASE`): a failing case of a fuzzer whose cases
    /// are independent (command line, loaders) replays alone.
    pub first_case: u64,
}

impl FuzzRun {
    /// `QOMVM_FUZZ_SEED` and `QOMVM_FUZZ_ITERATIONS` (0 = for ever) override the defaults.
    pub fn from_env(default_seed: u64, default_iterations: u64) -> Self {
        let var = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
            })
        };
        let seed = var("QOMVM_FUZZ_SEED").unwrap_or(default_seed);
        let iterations = match var("QOMVM_FUZZ_ITERATIONS") {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some(default_iterations),
        };
        let first_case = var("QOMVM_FUZZ_FIRST_CASE").unwrap_or(0);
        FuzzRun {
            seed,
            iterations,
            first_case,
        }
    }

    /// The case numbers to run: `iterations` of them from the first, or every number.
    pub fn cases(&self) -> impl Iterator<Item = u64> {
        let end = self
            .iterations
            .map_or(u64::MAX, |n| self.first_case.saturating_add(n));
        self.first_case..end
    }

    /// The generator of case `case`: each case has its own, so a failing case can be
    /// replayed alone from the seed and case number printed by the failure.
    pub fn rng_for(&self, case: u64) -> Rng {
        Rng::new(self.seed ^ case.wrapping_mul(0x1000_0000_01b3).rotate_left(17))
    }
}

/// How a run of qomvm on fuzzed options ended.
#[derive(Debug)]
pub struct QuitRun {
    /// The exit status (`None`: killed by a signal, or still running at the bound).
    pub status: Option<i32>,
    pub stderr: String,
    /// Still running at the bound (then killed).
    pub hung: bool,
}

impl QuitRun {
    /// A run ends well if the VM started and quit (status 0) or the options were refused
    /// with QEMU's one-line error (status 1, the first line `qomvm: ...`, perhaps with
    /// QEMU's hint after it: `Use -machine help...`); a panic (101), a
    /// signal, any other status or a hang is a bug. `what` names the input in the message.
    pub fn check(&self, what: &str) {
        let first = self.stderr.lines().find(|l| !l.trim().is_empty());
        let fine = !self.hung
            && !self.stderr.contains("panicked")
            && match self.status {
                Some(0) => true,
                Some(1) => first.is_some_and(|l| l.starts_with("qomvm: ")),
                _ => false,
            };
        assert!(
            fine,
            "{what}: status {:?}{}, stderr:\n{}",
            self.status,
            if self.hung {
                " (hung: killed at the bound)"
            } else {
                ""
            },
            self.stderr
        );
    }
}

/// Runs qomvm with `args` in `dir` and a QMP monitor on stdio that asks it to quit at once,
/// so a VM that starts ends by itself; kills it after `bound`.
pub fn run_qomvm_until_quit(
    qomvm: &str,
    args: &[std::ffi::OsString],
    dir: &std::path::Path,
    bound: std::time::Duration,
) -> QuitRun {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let stderr_path = dir.join("stderr");
    let stderr_file = std::fs::File::create(&stderr_path).unwrap();
    let mut child = Command::new(qomvm)
        .args(args)
        .args(["-qmp", "stdio"])
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .unwrap();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let deadline = std::time::Instant::now() + bound;
    let mut hung = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            hung = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    QuitRun {
        status: status.code(),
        stderr: String::from_utf8_lossy(&std::fs::read(&stderr_path).unwrap_or_default())
            .into_owned(),
        hung,
    }
}
