//! Parsing and formatting of resource quantities: byte sizes in Kubernetes
//! notation (`128Mi`, `1.5Gi`, `500M`, `1e9`), CPU amounts in millicores
//! (`500m`, `0.5`, `2`) and human durations (`500ms`, `5s`, `2m`, `1h`).
//!
//! All arithmetic is exact (integer mantissa and decimal scale, no floating
//! point), so `1.5Gi` is exactly 1610612736 bytes. Fractions of a byte or a
//! nanosecond are rounded up, as Kubernetes does; CPU amounts finer than one
//! millicore are rejected.

use std::fmt;
use std::time::Duration;

use serde::de;
use serde::{Deserialize, Deserializer, Serialize};

/// The accepted form of a byte quantity, quoted in error messages.
pub const BYTES_FORM: &str = "a Kubernetes quantity such as 128Mi, 1Gi or 500M";
/// The accepted form of a CPU quantity, quoted in error messages.
pub const CPU_FORM: &str = "a CPU quantity such as 500m, 0.5 or 2 (cores)";
/// The accepted form of a duration, quoted in error messages.
pub const DURATION_FORM: &str =
    "a duration such as 500ms, 5s, 2m, 1h or a plain number of seconds such as 1.5";

const BYTES_SUFFIXES: &str = "k, M, G, T, P, E (powers of 1000), Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or an exponent such as 1e9";
const CPU_SUFFIXES: &str = "m (millicores) or none (cores)";
const DURATION_SUFFIXES: &str = "ns, us, ms, s, m, h, d or none (seconds)";

/// Longest excerpt of the offending input repeated in an error message.
const MAX_SHOWN: usize = 64;

/// Why a quantity string could not be parsed. Every message states the
/// accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The value was empty or only whitespace.
    #[error("the value is empty; expected {expected}")]
    Empty {
        /// The accepted form.
        expected: &'static str,
    },
    /// The value had a minus sign.
    #[error("{input:?} is negative; expected {expected}")]
    Negative {
        /// The offending input (possibly shortened).
        input: String,
        /// The accepted form.
        expected: &'static str,
    },
    /// The value did not start with a decimal number.
    #[error("{input:?} is not a number; expected {expected}")]
    Malformed {
        /// The offending input (possibly shortened).
        input: String,
        /// The accepted form.
        expected: &'static str,
    },
    /// The number was followed by a suffix that is not accepted here.
    #[error(
        "{input:?} has an unknown suffix {suffix:?} (accepted suffixes: {accepted}); expected {expected}"
    )]
    UnknownSuffix {
        /// The offending input (possibly shortened).
        input: String,
        /// The unrecognised suffix (possibly shortened).
        suffix: String,
        /// The list of accepted suffixes.
        accepted: &'static str,
        /// The accepted form.
        expected: &'static str,
    },
    /// The value does not fit the target type.
    #[error(
        "{input:?} is out of range or has too many digits (the maximum is {max}); expected {expected}"
    )]
    Overflow {
        /// The offending input (possibly shortened).
        input: String,
        /// The largest representable value.
        max: String,
        /// The accepted form.
        expected: &'static str,
    },
    /// The value was zero where a positive value is required.
    #[error("{input:?} is zero; expected a positive value, {expected}")]
    Zero {
        /// The offending input (possibly shortened).
        input: String,
        /// The accepted form.
        expected: &'static str,
    },
    /// The value was more precise than the unit allows.
    #[error("{input:?} is finer than {precision}; expected {expected}")]
    TooPrecise {
        /// The offending input (possibly shortened).
        input: String,
        /// The smallest accepted step.
        precision: &'static str,
        /// The accepted form.
        expected: &'static str,
    },
}

fn shown(s: &str) -> String {
    if s.len() <= MAX_SHOWN {
        return s.to_owned();
    }
    let mut end = MAX_SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A non-negative decimal number `mantissa * 10^(exponent - scale)` followed
/// by an unparsed suffix.
#[derive(Debug)]
struct Parsed<'a> {
    mantissa: u128,
    /// Number of significant fractional digits.
    scale: u32,
    /// Explicit `e`/`E` exponent (0 when absent).
    exponent: i64,
    has_exponent: bool,
    rest: &'a str,
}

/// Result of scaling a parsed number by an integer multiplier.
#[derive(Debug, Clone, Copy)]
struct Scaled {
    floor: u128,
    exact: bool,
}

impl Scaled {
    fn ceil(self) -> Option<u128> {
        if self.exact {
            Some(self.floor)
        } else {
            self.floor.checked_add(1)
        }
    }
}

/// Clamp for absurd exponents; far beyond anything representable.
const EXPONENT_CLAMP: i64 = 1_000_000;

fn parse_number<'a>(
    s: &'a str,
    expected: &'static str,
    max: &str,
) -> Result<Parsed<'a>, QuantityError> {
    if s.is_empty() {
        return Err(QuantityError::Empty { expected });
    }
    let body = if let Some(b) = s.strip_prefix('+') {
        b
    } else if s.starts_with('-') {
        return Err(QuantityError::Negative {
            input: shown(s),
            expected,
        });
    } else {
        s
    };
    let overflow = || QuantityError::Overflow {
        input: shown(s),
        max: max.to_owned(),
        expected,
    };

    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &body[..i];
    let mut frac_digits = "";
    if i < bytes.len() && bytes[i] == b'.' {
        let start = i + 1;
        let mut j = start;
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        frac_digits = &body[start..j];
        i = j;
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(QuantityError::Malformed {
            input: shown(s),
            expected,
        });
    }
    let frac_digits = frac_digits.trim_end_matches('0');
    let mut mantissa: u128 = 0;
    for d in int_digits.bytes().chain(frac_digits.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(d - b'0')))
            .ok_or_else(overflow)?;
    }
    let scale = u32::try_from(frac_digits.len()).map_err(|_| overflow())?;

    let mut rest = &body[i..];
    if rest.starts_with('.') {
        return Err(QuantityError::Malformed {
            input: shown(s),
            expected,
        });
    }
    let mut exponent: i64 = 0;
    let mut has_exponent = false;
    let rb = rest.as_bytes();
    if let Some(&first) = rb.first()
        && (first == b'e' || first == b'E')
    {
        let mut k = 1;
        let negative = match rb.get(1) {
            Some(b'-') => {
                k = 2;
                true
            }
            Some(b'+') => {
                k = 2;
                false
            }
            _ => false,
        };
        let digits_start = k;
        while k < rb.len() && rb[k].is_ascii_digit() {
            k += 1;
        }
        if k > digits_start {
            for &d in &rb[digits_start..k] {
                exponent = (exponent * 10 + i64::from(d - b'0')).min(EXPONENT_CLAMP);
            }
            if negative {
                exponent = -exponent;
            }
            has_exponent = true;
            rest = &rest[k..];
        }
    }
    Ok(Parsed {
        mantissa,
        scale,
        exponent,
        has_exponent,
        rest,
    })
}

/// `10^p` as `u128`, `None` when it does not fit (p > 38).
fn pow10(p: u64) -> Option<u128> {
    u32::try_from(p).ok().and_then(|p| 10u128.checked_pow(p))
}

/// Computes `mantissa * multiplier * 10^(exponent - scale)`; `None` on overflow.
fn scale_by(p: &Parsed<'_>, multiplier: u128) -> Option<Scaled> {
    if p.mantissa == 0 {
        return Some(Scaled {
            floor: 0,
            exact: true,
        });
    }
    let net = p.exponent - i64::from(p.scale);
    let numerator = p.mantissa.checked_mul(multiplier)?;
    if net >= 0 {
        let factor = pow10(net.unsigned_abs())?;
        Some(Scaled {
            floor: numerator.checked_mul(factor)?,
            exact: true,
        })
    } else {
        match pow10(net.unsigned_abs()) {
            Some(div) => Some(Scaled {
                floor: numerator / div,
                exact: numerator % div == 0,
            }),
            // The divisor exceeds any u128 numerator: the value is in (0, 1).
            None => Some(Scaled {
                floor: 0,
                exact: false,
            }),
        }
    }
}

fn bytes_multiplier(suffix: &str) -> Option<u128> {
    Some(match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    })
}

/// Parses a byte quantity in Kubernetes notation.
///
/// Accepts a plain non-negative number (`134217728`), decimal suffixes
/// `k M G T P E` (powers of 1000), binary suffixes `Ki Mi Gi Ti Pi Ei`
/// (powers of 1024), decimals (`1.5Gi`) and exponent form (`1e9`, `5e-1`).
/// Fractions of a byte are rounded up. Surrounding whitespace is ignored.
pub fn parse_bytes(s: &str) -> Result<u64, QuantityError> {
    let s = s.trim();
    let max = format!("{} bytes", u64::MAX);
    let p = parse_number(s, BYTES_FORM, &max)?;
    if p.has_exponent && !p.rest.is_empty() {
        return Err(unknown_suffix(s, p.rest, BYTES_SUFFIXES, BYTES_FORM));
    }
    let multiplier = bytes_multiplier(p.rest)
        .ok_or_else(|| unknown_suffix(s, p.rest, BYTES_SUFFIXES, BYTES_FORM))?;
    scale_by(&p, multiplier)
        .and_then(Scaled::ceil)
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| QuantityError::Overflow {
            input: shown(s),
            max,
            expected: BYTES_FORM,
        })
}

fn unknown_suffix(
    input: &str,
    suffix: &str,
    accepted: &'static str,
    expected: &'static str,
) -> QuantityError {
    QuantityError::UnknownSuffix {
        input: shown(input),
        suffix: shown(suffix),
        accepted,
        expected,
    }
}

/// Parses a CPU amount into millicores.
///
/// `"0.5"` and `"500m"` are 500, `"2"` is 2000; exponent form (`5e-1`) is
/// accepted without a suffix. Zero, negative values and amounts finer than
/// one millicore are rejected.
pub fn parse_cpu_millis(s: &str) -> Result<u32, QuantityError> {
    let s = s.trim();
    let max = format_cpu_millis(u32::MAX);
    let p = parse_number(s, CPU_FORM, &max)?;
    let multiplier = match p.rest {
        "" => 1000,
        "m" if !p.has_exponent => 1,
        other => return Err(unknown_suffix(s, other, CPU_SUFFIXES, CPU_FORM)),
    };
    let overflow = || QuantityError::Overflow {
        input: shown(s),
        max: max.clone(),
        expected: CPU_FORM,
    };
    let scaled = scale_by(&p, multiplier).ok_or_else(overflow)?;
    if !scaled.exact {
        return Err(QuantityError::TooPrecise {
            input: shown(s),
            precision: "one millicore (1m = 0.001)",
            expected: CPU_FORM,
        });
    }
    if scaled.floor == 0 {
        return Err(QuantityError::Zero {
            input: shown(s),
            expected: CPU_FORM,
        });
    }
    u32::try_from(scaled.floor).map_err(|_| overflow())
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Parses a duration as typed on a command line.
///
/// Accepts a number followed by `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h` or
/// `d`; a plain number (decimals and exponent form allowed) means seconds.
/// Fractions of a nanosecond are rounded up. Zero is accepted; callers that
/// need a positive duration check for it.
pub fn parse_duration(s: &str) -> Result<Duration, QuantityError> {
    let s = s.trim();
    let max = format!("{}s", u64::MAX);
    let p = parse_number(s, DURATION_FORM, &max)?;
    if p.has_exponent && !p.rest.is_empty() {
        return Err(unknown_suffix(s, p.rest, DURATION_SUFFIXES, DURATION_FORM));
    }
    let nanos_per_unit: u128 = match p.rest {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "" | "s" => NANOS_PER_SEC,
        "m" => 60 * NANOS_PER_SEC,
        "h" => 3_600 * NANOS_PER_SEC,
        "d" => 86_400 * NANOS_PER_SEC,
        other => {
            return Err(unknown_suffix(s, other, DURATION_SUFFIXES, DURATION_FORM));
        }
    };
    let nanos = scale_by(&p, nanos_per_unit).and_then(Scaled::ceil);
    let secs = nanos.and_then(|n| u64::try_from(n / NANOS_PER_SEC).ok());
    match (nanos, secs) {
        (Some(n), Some(secs)) => {
            let sub = u32::try_from(n % NANOS_PER_SEC).expect("remainder below 10^9 fits u32");
            Ok(Duration::new(secs, sub))
        }
        _ => Err(QuantityError::Overflow {
            input: shown(s),
            max,
            expected: DURATION_FORM,
        }),
    }
}

/// Formats a byte count in the shortest exact Kubernetes notation: the
/// largest binary unit that divides it (`134217728` is `"128Mi"`), else the
/// largest decimal unit (`500000000` is `"500M"`), else the plain number.
/// The result always parses back to the same value with [`parse_bytes`].
pub fn format_bytes(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    const BINARY: [(&str, u64); 6] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    const DECIMAL: [(&str, u64); 6] = [
        ("E", 1_000_000_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("T", 1_000_000_000_000),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("k", 1_000),
    ];
    for (suffix, unit) in BINARY.iter().chain(DECIMAL.iter()) {
        if bytes.is_multiple_of(*unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Formats millicores as a CPU quantity: whole cores without suffix (`"2"`),
/// anything else in millicores (`"500m"`).
pub fn format_cpu_millis(millis: u32) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Formats a duration in the largest exact unit (`"24h"`, `"5m"`, `"30s"`,
/// `"500ms"`), else as decimal seconds (`"1.5s"`). The result parses back to
/// the same value with [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        if secs == 0 {
            "0s".to_owned()
        } else if secs.is_multiple_of(3600) {
            format!("{}h", secs / 3600)
        } else if secs.is_multiple_of(60) {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        }
    } else if secs == 0 && nanos.is_multiple_of(1_000_000) {
        format!("{}ms", nanos / 1_000_000)
    } else {
        let frac = format!("{nanos:09}");
        format!("{secs}.{}s", frac.trim_end_matches('0'))
    }
}

/// A quantity exactly as the user wrote it in JSON: either a string
/// (`"128Mi"`, `"500m"`) or a number (`134217728`, `0.5`). It serializes back
/// unchanged; interpretation happens in [`QuantityValue::to_bytes`] and
/// [`QuantityValue::to_cpu_millis`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum QuantityValue {
    /// A JSON string such as `"128Mi"`.
    Text(String),
    /// A JSON number such as `134217728` or `0.5`.
    Number(serde_json::Number),
}

impl QuantityValue {
    /// The value as quantity text (a JSON number in its JSON spelling).
    pub fn as_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            QuantityValue::Text(s) => std::borrow::Cow::Borrowed(s),
            QuantityValue::Number(n) => std::borrow::Cow::Owned(n.to_string()),
        }
    }

    /// Interprets the value as a byte count (see [`parse_bytes`]).
    pub fn to_bytes(&self) -> Result<u64, QuantityError> {
        parse_bytes(&self.as_text())
    }

    /// Interprets the value as CPU millicores (see [`parse_cpu_millis`]).
    pub fn to_cpu_millis(&self) -> Result<u32, QuantityError> {
        parse_cpu_millis(&self.as_text())
    }
}

impl fmt::Display for QuantityValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantityValue::Text(s) => f.write_str(s),
            QuantityValue::Number(n) => write!(f, "{n}"),
        }
    }
}

impl From<&str> for QuantityValue {
    fn from(s: &str) -> Self {
        QuantityValue::Text(s.to_owned())
    }
}

impl From<String> for QuantityValue {
    fn from(s: String) -> Self {
        QuantityValue::Text(s)
    }
}

impl From<u64> for QuantityValue {
    fn from(n: u64) -> Self {
        QuantityValue::Number(n.into())
    }
}

impl<'de> Deserialize<'de> for QuantityValue {
    /// Accepts a JSON string or number. Goes through [`serde_json::Value`]
    /// so that it works whatever serde_json features are enabled.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = "a quantity as a string such as \"128Mi\" or \"500m\", or a number";
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(s) => Ok(QuantityValue::Text(s)),
            serde_json::Value::Number(n) => Ok(QuantityValue::Number(n)),
            other => Err(de::Error::invalid_type(unexpected(&other), &EXPECTED)),
        }
    }
}

/// Describes a JSON value for serde's "invalid type" errors.
pub(crate) fn unexpected(v: &serde_json::Value) -> de::Unexpected<'_> {
    use serde_json::Value as V;
    match v {
        V::Null => de::Unexpected::Unit,
        V::Bool(b) => de::Unexpected::Bool(*b),
        V::Number(_) => de::Unexpected::Other("number"),
        V::String(s) => de::Unexpected::Str(s),
        V::Array(_) => de::Unexpected::Seq,
        V::Object(_) => de::Unexpected::Map,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bytes_plain_and_suffixes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("134217728"), Ok(134_217_728));
        assert_eq!(parse_bytes("1k"), Ok(1_000));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1T"), Ok(1_000_000_000_000));
        assert_eq!(parse_bytes("1P"), Ok(1_000_000_000_000_000));
        assert_eq!(parse_bytes("1E"), Ok(1_000_000_000_000_000_000));
        assert_eq!(parse_bytes("1Ki"), Ok(1024));
        assert_eq!(parse_bytes("128Mi"), Ok(134_217_728));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("1Ti"), Ok(1 << 40));
        assert_eq!(parse_bytes("1Pi"), Ok(1 << 50));
        assert_eq!(parse_bytes("15Ei"), Ok(15 << 60));
        assert_eq!(parse_bytes("+1Ki"), Ok(1024));
        assert_eq!(parse_bytes(" 1Ki "), Ok(1024));
    }

    #[test]
    fn bytes_decimals_and_exponents() {
        assert_eq!(parse_bytes("1.5Gi"), Ok(1_610_612_736));
        assert_eq!(parse_bytes("0.5Ki"), Ok(512));
        assert_eq!(parse_bytes(".5Ki"), Ok(512));
        assert_eq!(parse_bytes("1.Ki"), Ok(1024));
        assert_eq!(
            parse_bytes("1.000000000000000000000000000000000000000000Ki"),
            Ok(1024)
        );
        assert_eq!(parse_bytes("1e3"), Ok(1000));
        assert_eq!(parse_bytes("1E3"), Ok(1000));
        assert_eq!(parse_bytes("1.5e3"), Ok(1500));
        assert_eq!(parse_bytes("15e-1"), Ok(2), "fractions of a byte round up");
        assert_eq!(parse_bytes("1.5"), Ok(2));
        assert_eq!(parse_bytes("1e-100"), Ok(1));
        assert_eq!(parse_bytes("0e999999999999"), Ok(0));
        assert_eq!(
            parse_bytes("1Ei"),
            Ok(1 << 60),
            "Ei is a suffix, not an exponent"
        );
    }

    #[test]
    fn bytes_rejects_bad_forms() {
        assert_eq!(
            parse_bytes(""),
            Err(QuantityError::Empty {
                expected: BYTES_FORM
            })
        );
        assert!(matches!(
            parse_bytes("   "),
            Err(QuantityError::Empty { .. })
        ));
        assert!(matches!(
            parse_bytes("-1"),
            Err(QuantityError::Negative { .. })
        ));
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative { .. })
        ));
        assert!(matches!(
            parse_bytes("Gi"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_bytes("."),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_bytes("1.2.3"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_bytes("abc"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_bytes("NaN"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_bytes("12Zi"),
            Err(QuantityError::UnknownSuffix { ref suffix, .. }) if suffix == "Zi"
        ));
        assert!(matches!(
            parse_bytes("1K"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_bytes("1 Gi"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_bytes("1e3Ki"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_bytes("1e"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_bytes("16Ei"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_bytes("18446744073709551616"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_bytes("1e20"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_bytes("1e999999999999999999999"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_bytes(&"9".repeat(100)),
            Err(QuantityError::Overflow { .. })
        ));
        assert_eq!(parse_bytes("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn bytes_error_message_names_accepted_form() {
        let err = parse_bytes("12Zi").expect_err("Zi is not a suffix");
        let msg = err.to_string();
        assert!(msg.contains("\"Zi\""), "{msg}");
        assert!(msg.contains(BYTES_FORM), "{msg}");
    }

    #[test]
    fn long_inputs_are_shortened_in_errors() {
        let long = format!("1{}", "x".repeat(10_000));
        let msg = parse_bytes(&long).expect_err("bad suffix").to_string();
        assert!(msg.len() < 400, "{msg}");
        let long_multibyte = "é".repeat(100);
        let msg = parse_bytes(&long_multibyte)
            .expect_err("not a number")
            .to_string();
        assert!(msg.contains("..."), "{msg}");
    }

    #[test]
    fn cpu_millis() {
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("1m"), Ok(1));
        assert_eq!(parse_cpu_millis("0.001"), Ok(1));
        assert_eq!(parse_cpu_millis("5e-1"), Ok(500));
        assert_eq!(parse_cpu_millis("1.250"), Ok(1250));
        assert_eq!(parse_cpu_millis("4294967295m"), Ok(u32::MAX));
    }

    #[test]
    fn cpu_rejects_bad_forms() {
        assert!(matches!(
            parse_cpu_millis("0"),
            Err(QuantityError::Zero { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("0m"),
            Err(QuantityError::Zero { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("-1"),
            Err(QuantityError::Negative { .. })
        ));
        assert!(matches!(
            parse_cpu_millis(""),
            Err(QuantityError::Empty { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("0.0005"),
            Err(QuantityError::TooPrecise { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("1.5m"),
            Err(QuantityError::TooPrecise { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("2k"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("1e3m"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("5000000"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("one"),
            Err(QuantityError::Malformed { .. })
        ));
        let msg = parse_cpu_millis("0").expect_err("zero").to_string();
        assert!(msg.contains(CPU_FORM), "{msg}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.25h"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("1e2"), Ok(Duration::from_secs(100)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1e-10"), Ok(Duration::from_nanos(1)));
    }

    #[test]
    fn durations_reject_bad_forms() {
        assert!(matches!(
            parse_duration(""),
            Err(QuantityError::Empty { .. })
        ));
        assert!(matches!(
            parse_duration("-5s"),
            Err(QuantityError::Negative { .. })
        ));
        assert!(matches!(
            parse_duration("5 s"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_duration("5sec"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_duration("1h30m"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_duration("inf"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_duration("1e30d"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_duration("1e30"),
            Err(QuantityError::Overflow { .. })
        ));
        let msg = parse_duration("5x").expect_err("bad unit").to_string();
        assert!(msg.contains(DURATION_FORM), "{msg}");
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(0), "0");
        assert_eq!(format_bytes(134_217_728), "128Mi");
        assert_eq!(format_bytes(1 << 30), "1Gi");
        assert_eq!(format_bytes(16 << 30), "16Gi");
        assert_eq!(format_bytes(500_000_000), "500M");
        assert_eq!(format_bytes(1000), "1k");
        assert_eq!(format_bytes(1023), "1023");
        assert_eq!(format_cpu_millis(500), "500m");
        assert_eq!(format_cpu_millis(2000), "2");
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_secs(61)), "61s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn quantity_value_json() {
        let v: QuantityValue = serde_json::from_str("\"128Mi\"").expect("string");
        assert_eq!(v, QuantityValue::from("128Mi"));
        assert_eq!(v.to_bytes(), Ok(134_217_728));
        assert_eq!(serde_json::to_string(&v).expect("ser"), "\"128Mi\"");

        let v: QuantityValue = serde_json::from_str("134217728").expect("int");
        assert_eq!(v.to_bytes(), Ok(134_217_728));
        assert_eq!(serde_json::to_string(&v).expect("ser"), "134217728");

        let v: QuantityValue = serde_json::from_str("0.5").expect("float");
        assert_eq!(v.to_cpu_millis(), Ok(500));
        assert_eq!(serde_json::to_string(&v).expect("ser"), "0.5");

        let v: QuantityValue = serde_json::from_str("-3").expect("negative int parses");
        assert!(matches!(v.to_bytes(), Err(QuantityError::Negative { .. })));

        let v: QuantityValue = serde_json::from_str("1.5e9").expect("float");
        assert_eq!(v.to_bytes(), Ok(1_500_000_000));

        let err = serde_json::from_str::<QuantityValue>("true").expect_err("bool");
        assert!(err.to_string().contains("128Mi"), "{err}");
    }

    proptest! {
        #[test]
        fn format_bytes_round_trips(n in any::<u64>()) {
            prop_assert_eq!(parse_bytes(&format_bytes(n)), Ok(n));
        }

        #[test]
        fn format_bytes_round_trips_units(k in 0u64..=1024, shift in 0u32..=50) {
            let n = k << shift;
            prop_assert_eq!(parse_bytes(&format_bytes(n)), Ok(n));
        }

        #[test]
        fn format_duration_round_trips(secs in 0u64..=10_000_000_000, nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn format_cpu_round_trips(m in 1u32..) {
            prop_assert_eq!(parse_cpu_millis(&format_cpu_millis(m)), Ok(m));
        }

        #[test]
        fn any_input_gives_a_value_or_an_error_naming_the_form(s in "[-+0-9.eEkMGTPKimnsuhd ]{0,24}|\\PC{0,40}") {
            match parse_bytes(&s) {
                Ok(n) => prop_assert_eq!(parse_bytes(&format_bytes(n)), Ok(n)),
                Err(e) => prop_assert!(e.to_string().contains(BYTES_FORM), "{}", e),
            }
            match parse_cpu_millis(&s) {
                Ok(m) => prop_assert!(m > 0),
                Err(e) => prop_assert!(e.to_string().contains(CPU_FORM), "{}", e),
            }
            match parse_duration(&s) {
                Ok(d) => prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d)),
                Err(e) => prop_assert!(e.to_string().contains(DURATION_FORM), "{}", e),
            }
        }

        #[test]
        fn numeric_bytes_equal_plain_integers(n in any::<u64>()) {
            prop_assert_eq!(parse_bytes(&n.to_string()), Ok(n));
        }
    }
}
