/// Longest tenant, model, job or key id accepted.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ -")]
pub struct InvalidName {
    pub what: &'static str,
    pub value: String,
}

/// Checks that a tenant, model, job or key id can stand as one NATS subject token: no dots,
/// spaces or wildcards, so `fleet.results.<tenant>.<job_id>` always has exactly four tokens.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), InvalidName> {
    let valid = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_subject_tokens() {
        for good in ["a", "acme", "job-0001_x", &"x".repeat(MAX_NAME_LEN)] {
            assert!(validate_name("tenant", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a.b",
            "a b",
            "*",
            ">",
            "é",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(validate_name("tenant", bad).is_err(), "{bad}");
        }
    }
}
