//! Signal names on the wire (`TERM`, `INT`, ...).

use nix::sys::signal::Signal;
use tonic::Status;

/// Parses `TERM` or `SIGTERM`.
pub fn parse(name: &str) -> Result<Signal, Status> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>()
        .map_err(|_| Status::invalid_argument(format!("unknown signal {name:?}")))
}

/// `TERM` for SIGTERM.
pub fn name(signal: i32) -> String {
    Signal::try_from(signal)
        .map(|s| s.as_str().trim_start_matches("SIG").to_owned())
        .unwrap_or_else(|_| signal.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse("SIGINT").unwrap(), Signal::SIGINT);
        assert!(parse("BOGUS").is_err());
        assert_eq!(name(Signal::SIGKILL as i32), "KILL");
    }
}
