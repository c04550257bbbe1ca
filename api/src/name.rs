//! Names: DNS labels (RFC 1123), and the typed ids built on them.
//!
//! A [`Name`] is 1 to 63 bytes of lowercase ASCII letters, digits and `-`, starting with a letter
//! and ending with a letter or digit. The typed ids ([`TenantId`], [`CellId`], ...) wrap a `Name`
//! so that a tenant can never be passed where a cell is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, echo};

/// Longest name: the DNS label limit.
pub const NAME_LEN_MAX: usize = 63;

/// A validated DNS-label name.
#[derive(
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
#[rkyv(derive(Debug, PartialEq, Eq, PartialOrd, Ord))]
pub struct Name(String);

impl Name {
    /// Parses `value` as a name; `field` says where it came from, for the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, ModelError> {
        check_name(value).map_err(|rule| ModelError::InvalidName {
            field: field.to_owned(),
            value: echo(value),
            rule,
        })?;
        Ok(Self(value.to_owned()))
    }

    /// Parses `value` as a name.
    pub fn new(value: &str) -> Result<Self, ModelError> {
        Self::parse("name", value)
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Re-checks the rules, for values that arrived by a path that skipped [`Name::parse`]
    /// (rkyv deserialization builds the inner string directly).
    pub fn check(&self, field: &str) -> Result<(), ModelError> {
        Self::parse(field, &self.0).map(drop)
    }
}

/// The DNS-label rules; returns the first rule `value` breaks.
fn check_name(value: &str) -> Result<(), &'static str> {
    let bytes = value.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err("must not be empty");
    };
    if bytes.len() > NAME_LEN_MAX {
        return Err("must be at most 63 characters");
    }
    if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
        return Err("may contain only lowercase ASCII letters, digits and '-'");
    }
    if !first.is_ascii_lowercase() {
        return Err("must start with a lowercase letter");
    }
    if *last == b'-' {
        return Err("must end with a letter or digit");
    }
    Ok(())
}

impl TryFrom<String> for Name {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, ModelError> {
        check_name(&value).map_err(|rule| ModelError::InvalidName {
            field: "name".to_owned(),
            value: echo(&value),
            rule,
        })?;
        Ok(Self(value))
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Declares a typed id wrapping a [`Name`].
macro_rules! name_id {
    ($(#[$doc:meta])* $id:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        #[serde(transparent)]
        #[rkyv(derive(Debug, PartialEq, Eq))]
        pub struct $id(pub Name);

        impl $id {
            /// Parses `value` as this kind of id.
            pub fn new(value: &str) -> Result<Self, ModelError> {
                Name::parse($field, value).map(Self)
            }

            /// The id as a string.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

name_id!(
    /// A tenant: a virtual cluster, the unit of isolation and quota.
    TenantId,
    "tenant"
);
name_id!(
    /// A cell: an independent slice of a region, about 100,000 hosts.
    CellId,
    "cell"
);
name_id!(
    /// A site: a cloud data centre or an edge site.
    SiteId,
    "site"
);
name_id!(
    /// A workload's name, unique within its tenant.
    WorkloadName,
    "workload"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_of(value: &str) -> &'static str {
        match Name::new(value) {
            Err(ModelError::InvalidName { rule, .. }) => rule,
            other => panic!("{value:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web", "web-1", "a1b2", &"x".repeat(63)] {
            assert_eq!(Name::new(ok).map(|n| n.as_str().to_owned()), Ok(ok.to_owned()));
        }
    }

    #[test]
    fn refuses_each_rule_with_its_reason() {
        assert_eq!(rule_of(""), "must not be empty");
        assert_eq!(rule_of(&"x".repeat(64)), "must be at most 63 characters");
        assert_eq!(rule_of("Web"), "may contain only lowercase ASCII letters, digits and '-'");
        assert_eq!(rule_of("wéb"), "may contain only lowercase ASCII letters, digits and '-'");
        assert_eq!(rule_of("a_b"), "may contain only lowercase ASCII letters, digits and '-'");
        assert_eq!(rule_of("a.b"), "may contain only lowercase ASCII letters, digits and '-'");
        assert_eq!(rule_of("1abc"), "must start with a lowercase letter");
        assert_eq!(rule_of("-abc"), "must start with a lowercase letter");
        assert_eq!(rule_of("abc-"), "must end with a letter or digit");
    }

    #[test]
    fn error_names_field_and_cuts_long_values() {
        let long = "Ö".repeat(10_000);
        let err = TenantId::new(&long).unwrap_err();
        assert_eq!(err.field(), "tenant");
        let message = err.to_string();
        assert!(message.starts_with("tenant: "), "{message}");
        assert!(message.len() < 300, "a huge value must not be echoed whole: {}", message.len());
    }

    #[test]
    fn serde_goes_through_the_rules() {
        let ok: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
        let err = serde_json::from_str::<TenantId>("\"Acme Corp\"").unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
        assert!(serde_json::from_str::<Name>("42").is_err());
    }
}
