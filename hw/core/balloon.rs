//! The machine's memory balloon (QEMU's `system/balloon.c`): the one balloon device of a
//! machine registers itself here at realize, and the monitors reach it through
//! [`Balloon`]: QMP's `balloon` and `query-balloon`, HMP's `balloon` and `info balloon`.
//! The device reports the guest's changes of `actual` here, and the monitor turns them into
//! `BALLOON_CHANGE` events.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// What a balloon device does for the monitors (QEMU's `QEMUBalloonEvent` and
/// `QEMUBalloonStatus`).
pub trait BalloonHandler: Send + Sync {
    /// Asks the guest to leave it `target` bytes of RAM (QEMU's `virtio_balloon_to_target`).
    fn to_target(&self, target: u64);
    /// The guest's RAM in bytes, less what it gave the balloon (QEMU's `virtio_balloon_stat`).
    fn actual(&self) -> u64;
}

/// Errors of the balloon commands, in QEMU's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    /// No balloon device in the machine (QAPI class `DeviceNotActive`).
    #[error("No balloon device has been activated")]
    NotActivated,
    /// A target of zero or less.
    #[error("Parameter 'target' expects a size")]
    BadTarget,
    /// A second balloon device.
    #[error("Only one balloon device is supported")]
    AlreadyRegistered,
}

/// Receives the guest's new `actual` (bytes of RAM it keeps) each time it changes.
pub type BalloonChangeListener = Arc<dyn Fn(u64) + Send + Sync>;

/// A machine's balloon slot: at most one device, and who wants to hear of its changes.
#[derive(Default)]
pub struct Balloon {
    handler: Mutex<Option<Weak<dyn BalloonHandler>>>,
    listeners: Mutex<Vec<BalloonChangeListener>>,
}

impl Balloon {
    /// QEMU's `qemu_add_balloon_handler`: a device registers at realize. The registry holds
    /// it weakly, so it never keeps a device alive.
    pub fn add_handler(&self, handler: Weak<dyn BalloonHandler>) -> Result<(), BalloonError> {
        let mut slot = self.handler.lock();
        if slot.as_ref().is_some_and(|h| h.strong_count() > 0) {
            return Err(BalloonError::AlreadyRegistered);
        }
        *slot = Some(handler);
        Ok(())
    }

    /// QEMU's `qemu_remove_balloon_handler`: only the registered device removes itself.
    pub fn remove_handler(&self, handler: &Weak<dyn BalloonHandler>) {
        let mut slot = self.handler.lock();
        if slot.as_ref().is_some_and(|h| Weak::ptr_eq(h, handler)) {
            *slot = None;
        }
    }

    fn handler(&self) -> Result<Arc<dyn BalloonHandler>, BalloonError> {
        self.handler
            .lock()
            .as_ref()
            .and_then(Weak::upgrade)
            .ok_or(BalloonError::NotActivated)
    }

    /// Whether a balloon device is registered.
    pub fn is_active(&self) -> bool {
        self.handler().is_ok()
    }

    /// QEMU's `qmp_balloon`: asks the guest to shrink or grow to `target` bytes.
    pub fn set_target(&self, target: i64) -> Result<(), BalloonError> {
        let handler = self.handler()?;
        if target <= 0 {
            return Err(BalloonError::BadTarget);
        }
        handler.to_target(target as u64);
        Ok(())
    }

    /// QEMU's `qmp_query_balloon`: the guest's RAM in bytes, less the balloon.
    pub fn actual(&self) -> Result<u64, BalloonError> {
        Ok(self.handler()?.actual())
    }

    /// Adds an in-process listener for the guest's changes (monitor clients get the
    /// `BALLOON_CHANGE` event without one).
    pub fn add_change_listener(&self, listener: BalloonChangeListener) {
        self.listeners.lock().push(listener);
    }

    /// The device reports a new `actual` (QEMU's `qapi_event_send_balloon_change`).
    pub fn changed(&self, actual: u64) {
        crate::core::qapi_event::emit(
            "BALLOON_CHANGE",
            Some(crate::core::qapi_event::json!({ "actual": actual })),
        );
        let listeners = self.listeners.lock().clone();
        for l in listeners {
            l(actual);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Fake(AtomicU64);

    impl BalloonHandler for Fake {
        fn to_target(&self, target: u64) {
            self.0.store(target, Ordering::SeqCst);
        }
        fn actual(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn one_device_answers_and_errors_are_qemus() {
        let b = Balloon::default();
        assert_eq!(b.set_target(1), Err(BalloonError::NotActivated));
        assert_eq!(b.actual(), Err(BalloonError::NotActivated));
        let dev: Arc<dyn BalloonHandler> = Arc::new(Fake::default());
        let weak = Arc::downgrade(&dev);
        b.add_handler(weak.clone()).unwrap();
        let other: Arc<dyn BalloonHandler> = Arc::new(Fake::default());
        assert_eq!(
            b.add_handler(Arc::downgrade(&other)),
            Err(BalloonError::AlreadyRegistered)
        );
        assert_eq!(b.set_target(0), Err(BalloonError::BadTarget));
        assert_eq!(
            b.set_target(-1).unwrap_err().to_string(),
            "Parameter 'target' expects a size"
        );
        b.set_target(4096).unwrap();
        assert_eq!(b.actual(), Ok(4096));
        b.remove_handler(&Arc::downgrade(&other));
        assert!(b.is_active(), "only the registered device removes itself");
        b.remove_handler(&weak);
        assert!(!b.is_active());
        // A dropped device counts as gone.
        b.add_handler(Arc::downgrade(&other)).unwrap();
        drop(other);
        assert_eq!(b.actual(), Err(BalloonError::NotActivated));
    }
}
