//! The model's one error type.

/// Longest excerpt of an offending value echoed back in an error message.
const ECHO_LEN_MAX: usize = 64;

/// A value that breaks a rule of the model. Every variant names the field it was found in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A name that is not a DNS label.
    #[error("{field}: {value:?} is not a valid name: {rule}")]
    InvalidName {
        /// Where the name was found, for example `workload.name`.
        field: String,
        /// The offending value (cut to a short excerpt).
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A number outside its allowed range.
    #[error("{field}: {value} is out of range: must be within {min}..={max}")]
    OutOfRange {
        /// Where the number was found, for example `resources.cpu_milli`.
        field: String,
        /// The offending value.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// A string or list longer than its cap.
    #[error("{field}: length {len} exceeds the cap of {max}")]
    TooLong {
        /// Where the value was found.
        field: String,
        /// Its length (bytes for strings, items for lists).
        len: usize,
        /// The cap.
        max: usize,
    },
    /// Any other broken rule, stated in words.
    #[error("{field}: {value:?} is invalid: {rule}")]
    Invalid {
        /// Where the value was found.
        field: String,
        /// The offending value (cut to a short excerpt).
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
}

impl ModelError {
    /// The field the error is about.
    pub fn field(&self) -> &str {
        match self {
            Self::InvalidName { field, .. }
            | Self::OutOfRange { field, .. }
            | Self::TooLong { field, .. }
            | Self::Invalid { field, .. } => field,
        }
    }

    /// The same error, found inside `outer` (`workload` + `name` gives `workload.name`).
    pub fn within(mut self, outer: &str) -> Self {
        let field = match &mut self {
            Self::InvalidName { field, .. }
            | Self::OutOfRange { field, .. }
            | Self::TooLong { field, .. }
            | Self::Invalid { field, .. } => field,
        };
        *field = format!("{outer}.{field}");
        self
    }
}

/// A short, printable excerpt of `value` for an error message: never echo a megabyte back.
pub(crate) fn echo(value: &str) -> String {
    match value.char_indices().nth(ECHO_LEN_MAX) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_owned(),
    }
}

/// Checks `min <= value <= max` for the field `field`.
pub(crate) fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ModelError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ModelError::OutOfRange { field: field.to_owned(), value, min, max })
    }
}

/// Checks that `len <= max` for the field `field`.
pub(crate) fn check_len(field: &str, len: usize, max: usize) -> Result<(), ModelError> {
    if len <= max { Ok(()) } else { Err(ModelError::TooLong { field: field.to_owned(), len, max }) }
}
