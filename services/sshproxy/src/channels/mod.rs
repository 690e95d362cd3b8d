//! One task per SSH channel.

pub mod agent;
pub mod forward;
pub mod remote;
pub mod session;
