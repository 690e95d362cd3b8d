//! Onboarding rules: what happens to someone who logs in through an
//! OpenID Provider for the first time. Rules are per provider and tried in
//! order; the first whose username pattern matches decides. When none
//! matches, the login is rejected: a provider being configured does not by
//! itself let everyone who has an account there in.

use serde::{Deserialize, Serialize};

/// What a rule decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnboardingAction {
    /// Create the account, active.
    Allow,
    /// Refuse.
    Reject,
    /// Create the account, waiting for an administrator's approval.
    Waitlist,
}

/// One rule as configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnboardingRule {
    /// Glob over the mapped username: `*` any run, `?` one character.
    #[serde(default = "any")]
    pub username: String,
    pub action: OnboardingAction,
}

fn any() -> String {
    "*".to_owned()
}

/// A pattern that is not a valid glob.
#[derive(Debug, thiserror::Error)]
#[error("onboarding rule {index}: bad username pattern {pattern:?}: {message}")]
pub struct RuleError {
    pub index: usize,
    pub pattern: String,
    pub message: String,
}

/// The compiled rules of one provider.
pub struct Onboarding {
    rules: Vec<(regex_lite::Regex, OnboardingAction)>,
}

impl Onboarding {
    /// Compiles the rules.
    pub fn compile(rules: &[OnboardingRule]) -> Result<Self, RuleError> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                glob(&rule.username)
                    .map(|re| (re, rule.action))
                    .map_err(|message| RuleError {
                        index,
                        pattern: rule.username.clone(),
                        message,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// The decision for `username`.
    pub fn decide(&self, username: &str) -> OnboardingAction {
        self.rules
            .iter()
            .find(|(pattern, _)| pattern.is_match(username))
            .map_or(OnboardingAction::Reject, |(_, action)| *action)
    }
}

fn glob(pattern: &str) -> Result<regex_lite::Regex, String> {
    if pattern.is_empty() {
        return Err("empty pattern".to_owned());
    }
    let mut re = String::from("^");
    for c in pattern.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex_lite::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex_lite::Regex::new(&re).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(username: &str, action: OnboardingAction) -> OnboardingRule {
        OnboardingRule {
            username: username.to_owned(),
            action,
        }
    }

    #[test]
    fn first_matching_rule_decides_and_none_rejects() {
        let onboarding = Onboarding::compile(&[
            rule("mallory*", OnboardingAction::Reject),
            rule("wait-?", OnboardingAction::Waitlist),
            rule("*", OnboardingAction::Allow),
        ])
        .unwrap();
        assert_eq!(onboarding.decide("mallory2"), OnboardingAction::Reject);
        assert_eq!(onboarding.decide("wait-a"), OnboardingAction::Waitlist);
        assert_eq!(onboarding.decide("wait-ab"), OnboardingAction::Allow);
        assert_eq!(onboarding.decide("alice"), OnboardingAction::Allow);
        let none = Onboarding::compile(&[rule("a.b", OnboardingAction::Allow)]).unwrap();
        // `.` is literal, not a regex wildcard.
        assert_eq!(none.decide("axb"), OnboardingAction::Reject);
        assert_eq!(none.decide("a.b"), OnboardingAction::Allow);
        assert_eq!(
            Onboarding::compile(&[]).unwrap().decide("anyone"),
            OnboardingAction::Reject
        );
    }

    #[test]
    fn empty_pattern_is_an_error() {
        let error = Onboarding::compile(&[rule("", OnboardingAction::Allow)])
            .err()
            .unwrap();
        assert_eq!(error.index, 0);
    }
}
