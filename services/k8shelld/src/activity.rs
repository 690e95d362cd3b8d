//! When a user last typed, for idle auto-stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Time of the last user input, shared by every handler.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    last_input_ms: Arc<AtomicU64>,
}

impl Activity {
    /// Records input now.
    pub fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_input_ms.store(now, Ordering::Relaxed);
    }

    /// The last input, if any.
    pub fn last_input(&self) -> Option<SystemTime> {
        match self.last_input_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + std::time::Duration::from_millis(ms)),
        }
    }
}
