//! I/O limits (QEMU's `util/throttle.c` and `block/throttle-groups.c`): leaky buckets for
//! bytes and operations per second, total or per direction, each with an optional burst
//! rate and burst length, shared by the backends of one throttle group. A request waits,
//! on the thread that issues it, until every bucket it fills has room; then it is counted.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// QEMU's `THROTTLE_VALUE_MAX`.
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// A bucket's index (QEMU's `BucketType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// Bytes, either direction.
    BpsTotal = 0,
    /// Bytes read.
    BpsRead,
    /// Bytes written.
    BpsWrite,
    /// Operations, either direction.
    OpsTotal,
    /// Reads.
    OpsRead,
    /// Writes.
    OpsWrite,
}

const BUCKETS: usize = 6;

/// One bucket's limits (QEMU's `LeakyBucket` configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketLimits {
    /// The average rate per second; 0: unlimited.
    pub avg: u64,
    /// The burst rate per second; 0: none (a tenth of a second of `avg` is allowed).
    pub max: u64,
    /// How many seconds a burst at `max` may last.
    pub burst_length: u64,
}

impl Default for BucketLimits {
    fn default() -> Self {
        BucketLimits {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A throttle configuration (QEMU's `ThrottleConfig`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// By [`Bucket`].
    pub buckets: [BucketLimits; BUCKETS],
    /// `iops_size`: a request larger than this counts as several operations.
    pub op_size: u64,
}

impl ThrottleConfig {
    /// The limits of `bucket`.
    pub fn bucket(&self, bucket: Bucket) -> &BucketLimits {
        &self.buckets[bucket as usize]
    }

    /// The limits of `bucket`, to change.
    pub fn bucket_mut(&mut self, bucket: Bucket) -> &mut BucketLimits {
        &mut self.buckets[bucket as usize]
    }

    /// Whether any limit applies (QEMU's `throttle_enabled`).
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// QEMU's `throttle_is_valid`, with its messages.
    pub fn validate(&self) -> Result<(), String> {
        let conflicting =
            |total: Bucket, read: Bucket, write: Bucket, f: fn(&BucketLimits) -> u64| {
                f(self.bucket(total)) != 0
                    && (f(self.bucket(read)) != 0 || f(self.bucket(write)) != 0)
            };
        use Bucket::*;
        if conflicting(BpsTotal, BpsRead, BpsWrite, |b| b.avg)
            || conflicting(OpsTotal, OpsRead, OpsWrite, |b| b.avg)
            || conflicting(BpsTotal, BpsRead, BpsWrite, |b| b.max)
            || conflicting(OpsTotal, OpsRead, OpsWrite, |b| b.max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.op_size != 0
            && [OpsTotal, OpsRead, OpsWrite]
                .iter()
                .all(|&b| self.bucket(b).avg == 0)
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for b in &self.buckets {
            if b.avg > THROTTLE_VALUE_MAX || b.max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if b.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if b.burst_length > 1 && b.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if b.max != 0 && b.burst_length > THROTTLE_VALUE_MAX / b.max {
                return Err("burst length too high for this burst rate".into());
            }
            if b.max != 0 && b.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if b.max != 0 && b.max < b.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

/// A bucket's fill (QEMU's `LeakyBucket` state), with its limits as in use: without a
/// burst rate, a tenth of a second of the average (`throttle_fix_bucket`).
#[derive(Clone, Copy, Debug, Default)]
struct LeakyBucket {
    avg: f64,
    max: f64,
    burst_length: f64,
    level: f64,
    burst_level: f64,
}

impl LeakyBucket {
    fn new(limits: &BucketLimits) -> Self {
        let avg = limits.avg as f64;
        let max = if limits.avg != 0 && limits.max == 0 {
            avg / 10.0
        } else {
            limits.max as f64
        };
        LeakyBucket {
            avg,
            max,
            burst_length: limits.burst_length as f64,
            level: 0.0,
            burst_level: 0.0,
        }
    }

    /// QEMU's `throttle_leak_bucket`.
    fn leak(&mut self, seconds: f64) {
        self.level = (self.level - self.avg * seconds).max(0.0);
        if self.burst_length > 1.0 {
            self.burst_level = (self.burst_level - self.max * seconds).max(0.0);
        }
    }

    /// QEMU's `throttle_compute_wait`: how long until the bucket has room.
    fn wait(&self) -> f64 {
        if self.avg == 0.0 {
            return 0.0;
        }
        let (bucket_size, burst_bucket_size) = if self.max == 0.0 {
            (self.avg / 10.0, 0.0)
        } else {
            (self.max * self.burst_length, self.max / 10.0)
        };
        let extra = self.level - bucket_size;
        if extra > 0.0 {
            return extra / self.avg;
        }
        if self.burst_length > 1.0 {
            let extra = self.burst_level - burst_bucket_size;
            if extra > 0.0 {
                return extra / self.max;
            }
        }
        0.0
    }

    fn add(&mut self, amount: f64) {
        self.level += amount;
        if self.burst_length > 1.0 {
            self.burst_level += amount;
        }
    }
}

struct GroupState {
    config: ThrottleConfig,
    buckets: [LeakyBucket; BUCKETS],
    previous_leak: Instant,
    /// By direction (read, write): the members with requests waiting, and how many.
    waiting: [Vec<(usize, usize)>; 2],
    /// By direction: the member whose request goes next while several wait (QEMU's
    /// `tokens`, handed round robin so one member's many requests cannot starve another's).
    turn: [Option<usize>; 2],
}

impl GroupState {
    fn join(&mut self, dir: usize, member: usize) {
        match self.waiting[dir].iter_mut().find(|(m, _)| *m == member) {
            Some((_, n)) => *n += 1,
            None => self.waiting[dir].push((member, 1)),
        }
    }

    fn leave(&mut self, dir: usize, member: usize) {
        let waiting = &mut self.waiting[dir];
        if let Some(i) = waiting.iter().position(|(m, _)| *m == member) {
            waiting[i].1 -= 1;
            if waiting[i].1 == 0 {
                waiting.remove(i);
            }
        }
    }

    /// Whether `member` may go now as far as turns go: its turn, or the member whose turn
    /// it is has nothing waiting.
    fn has_turn(&self, dir: usize, member: usize) -> bool {
        match self.turn[dir] {
            None => true,
            Some(t) => t == member || !self.waiting[dir].iter().any(|(m, _)| *m == t),
        }
    }

    /// Hands the turn to the next member after `member` (by member order, round) that has
    /// requests waiting: itself if only it has (QEMU's `next_throttle_token`).
    fn pass_turn(&mut self, dir: usize, member: usize) {
        let waiting = &self.waiting[dir];
        let next = waiting
            .iter()
            .map(|(m, _)| *m)
            .filter(|&m| m > member)
            .min()
            .or_else(|| waiting.iter().map(|(m, _)| *m).min());
        self.turn[dir] = next;
    }
}

/// A throttle group (QEMU's `ThrottleGroup`): one configuration and one set of buckets for
/// every backend in it.
pub struct ThrottleGroup {
    name: String,
    state: Mutex<GroupState>,
    /// Wakes waiting requests when their limits change or stop applying.
    changed: Condvar,
}

/// Live groups, by name (QEMU's `throttle_groups`).
static GROUPS: Mutex<Vec<Weak<ThrottleGroup>>> = Mutex::new(Vec::new());

impl ThrottleGroup {
    /// The group `name`, made if no backend is in it (QEMU's `throttle_group_incref`).
    pub fn get(name: &str) -> Arc<ThrottleGroup> {
        let mut groups = GROUPS.lock();
        groups.retain(|g| g.strong_count() > 0);
        if let Some(g) = groups
            .iter()
            .filter_map(Weak::upgrade)
            .find(|g| g.name == name)
        {
            return g;
        }
        let group = Arc::new(ThrottleGroup {
            name: name.to_string(),
            state: Mutex::new(GroupState {
                config: ThrottleConfig::default(),
                buckets: [LeakyBucket::default(); BUCKETS],
                previous_leak: Instant::now(),
                waiting: [Vec::new(), Vec::new()],
                turn: [None, None],
            }),
            changed: Condvar::new(),
        });
        groups.push(Arc::downgrade(&group));
        group
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's limits, as set.
    pub fn config(&self) -> ThrottleConfig {
        self.state.lock().config
    }

    /// Sets the group's limits (QEMU's `throttle_config`): the buckets start empty.
    pub fn set_config(&self, config: ThrottleConfig) {
        let mut st = self.state.lock();
        st.config = config;
        st.buckets = config.buckets.map(|b| LeakyBucket::new(&b));
        st.previous_leak = Instant::now();
        self.changed.notify_all();
    }

    /// Wakes the requests waiting in the group, to look again at whether the limits
    /// still apply to them (a member left, or is draining).
    pub fn wake_all(&self) {
        let _st = self.state.lock();
        self.changed.notify_all();
    }

    /// Waits until a request of `bytes` in direction `write` from `member` (any number
    /// that tells the group's members apart) may go, then counts it (QEMU's
    /// `throttle_group_co_io_limits_intercept`). While several members wait, they go in
    /// turn. While `applies` says no (the member left the group, or drains: QEMU's
    /// `io_limits_disabled`) the request goes at once, uncounted; whoever changes that
    /// calls [`ThrottleGroup::wake_all`].
    pub fn intercept(&self, member: usize, write: bool, bytes: u64, applies: impl Fn() -> bool) {
        let direction =
            |read: Bucket, write_bucket: Bucket| if write { write_bucket } else { read };
        let checked = [
            Bucket::BpsTotal,
            Bucket::OpsTotal,
            direction(Bucket::BpsRead, Bucket::BpsWrite),
            direction(Bucket::OpsRead, Bucket::OpsWrite),
        ];
        let dir = usize::from(write);
        let mut st = self.state.lock();
        let mut joined = false;
        loop {
            if !applies() {
                if joined {
                    st.leave(dir, member);
                    self.changed.notify_all();
                }
                return;
            }
            let wait = {
                let now = Instant::now();
                let elapsed = now
                    .saturating_duration_since(st.previous_leak)
                    .as_secs_f64();
                st.previous_leak = now;
                for b in &mut st.buckets {
                    b.leak(elapsed);
                }
                let wait = checked
                    .iter()
                    .map(|&b| st.buckets[b as usize].wait())
                    .fold(0.0, f64::max);
                if wait == 0.0 && st.has_turn(dir, member) {
                    let op_size = st.config.op_size;
                    let units = if op_size != 0 && bytes > op_size {
                        bytes as f64 / op_size as f64
                    } else {
                        1.0
                    };
                    st.buckets[Bucket::BpsTotal as usize].add(bytes as f64);
                    st.buckets[direction(Bucket::BpsRead, Bucket::BpsWrite) as usize]
                        .add(bytes as f64);
                    st.buckets[Bucket::OpsTotal as usize].add(units);
                    st.buckets[direction(Bucket::OpsRead, Bucket::OpsWrite) as usize].add(units);
                    if joined {
                        st.leave(dir, member);
                    }
                    st.pass_turn(dir, member);
                    if !st.waiting[dir].is_empty() {
                        // The member whose turn it is now looks again.
                        self.changed.notify_all();
                    }
                    return;
                }
                if !joined {
                    st.join(dir, member);
                    joined = true;
                }
                // Not its turn: woken when the turn passes.
                if wait == 0.0 {
                    1.0
                } else {
                    wait
                }
            };
            // A change of limits, or of whether they apply, wakes the wait early.
            self.changed
                .wait_for(&mut st, Duration::from_secs_f64(wait.min(1.0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_speaks_qemus_words() {
        let mut c = ThrottleConfig::default();
        assert!(c.validate().is_ok());
        c.bucket_mut(Bucket::BpsTotal).avg = 100;
        c.bucket_mut(Bucket::BpsRead).avg = 10;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("cannot be used at the same time"));
        let mut c = ThrottleConfig {
            op_size: 4096,
            ..Default::default()
        };
        assert_eq!(
            c.validate().unwrap_err(),
            "iops size requires an iops value to be set"
        );
        c.bucket_mut(Bucket::OpsTotal).avg = 10;
        c.bucket_mut(Bucket::OpsTotal).max = 5;
        assert_eq!(
            c.validate().unwrap_err(),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        c.bucket_mut(Bucket::OpsTotal).max = 0;
        c.bucket_mut(Bucket::OpsTotal).burst_length = 2;
        assert_eq!(
            c.validate().unwrap_err(),
            "burst length set without burst rate"
        );
    }

    #[test]
    fn a_full_bucket_waits_as_long_as_its_excess_takes_to_leak() {
        let limits = BucketLimits {
            avg: 10,
            ..Default::default()
        };
        let mut b = LeakyBucket::new(&limits);
        // A tenth of a second's worth (1 op) passes; the second op is 1 over.
        b.add(1.0);
        assert_eq!(b.wait(), 0.0);
        b.add(1.0);
        assert!((b.wait() - 0.1).abs() < 1e-9, "{}", b.wait());
        b.leak(0.1);
        assert_eq!(b.wait(), 0.0);
    }

    /// Members of a group go in turn: one member issuing from eight threads and another
    /// from one share 20 ops a second about evenly, not 8 to 1.
    #[test]
    fn members_with_requests_waiting_go_in_turn() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let group = ThrottleGroup::get("members-in-turn");
        let mut config = ThrottleConfig::default();
        config.bucket_mut(Bucket::OpsTotal).avg = 20;
        group.set_config(config);
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let threads: Vec<_> = (0..9)
            .map(|i| {
                let (group, stop, counts) = (group.clone(), stop.clone(), counts.clone());
                let member = usize::from(i == 8);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        group.intercept(member, false, 512, || !stop.load(Ordering::SeqCst));
                        counts[member].fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let (many, one) = (
            counts[0].load(Ordering::SeqCst),
            counts[1].load(Ordering::SeqCst),
        );
        stop.store(true, Ordering::SeqCst);
        group.wake_all();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            one * 10 >= (many + one) * 3,
            "the lone member got {one} of {} ops",
            many + one
        );
    }
}
