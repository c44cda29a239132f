//! Noise: what differs between two known-good versions is not a regression.
//!
//! As Diffy does, each copy is answered by the candidate, the primary and (optionally) a
//! secondary, a second instance of the known-good version. Per endpoint and field, the
//! comparison counts how often the candidate differs from the primary (the *raw* rate `r`) and
//! how often the secondary differs from the primary (the *noise* rate `n`: timestamps, random
//! ids, counters, which differ between any two answers). A field that differs
//!
//! - is **noise** when `r <= n * (1 + relative) + absolute`: the candidate differs no more
//!   than the known-good versions differ from each other, within the thresholds;
//! - is **differing** otherwise: a likely regression.
//!
//! Defaults: `relative` 0.2 (20%), `absolute` 0.01 (one copy in a hundred). Without a
//! secondary, `n` is 0 and every field that differs more often than `absolute` is differing,
//! unless ignored by configuration. Noisy fields are shown as noise, not hidden.

use std::collections::BTreeMap;

use crate::json::Differences;

/// How raw and noise rates are weighed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// How much more often than the noise a field may differ and still be noise, relative.
    pub relative: f64,
    /// … and in absolute terms (a share of the copies compared).
    pub absolute: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            relative: 0.2,
            absolute: 0.01,
        }
    }
}

/// A field's counts at one endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldCounts {
    /// Copies where the candidate differed from the primary here.
    pub raw: u64,
    /// Copies where the secondary differed from the primary here.
    pub noise: u64,
}

/// What a field's counts say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Differs more than the known-good versions do: a likely regression.
    Differing,
    /// Differs no more than the known-good versions do.
    Noise,
}

impl Verdict {
    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Differing => "differing",
            Verdict::Noise => "noise",
        }
    }
}

/// One endpoint's counts, fields bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Copies compared (candidate against primary).
    pub compared: u64,
    /// Of them, those a secondary answered too (the noise rates' base).
    pub with_secondary: u64,
    /// Per field.
    pub fields: BTreeMap<String, FieldCounts>,
    /// Field differences counted under [`OTHER_FIELDS`] once `max_fields` were known.
    pub other: FieldCounts,
}

/// The name fields past the bound are counted under.
pub const OTHER_FIELDS: &str = "(other fields)";

impl EndpointStats {
    /// Counts one copy: the candidate's differences from the primary, and the secondary's if
    /// one answered, by key ([`crate::json::FieldDiff::key`]). A key is counted once per
    /// copy however often it differs in it. At most `max_fields` keys are counted by name; the
    /// rest together, once per copy.
    pub fn record(&mut self, raw: &Differences, noise: Option<&Differences>, max_fields: usize) {
        self.compared += 1;
        let mut other = false;
        for key in &raw.keys {
            match self.counts(key, max_fields) {
                Some(c) => c.raw += 1,
                None => other = true,
            }
        }
        self.other.raw += u64::from(other);
        if let Some(noise) = noise {
            self.with_secondary += 1;
            let mut other = false;
            for key in &noise.keys {
                match self.counts(key, max_fields) {
                    Some(c) => c.noise += 1,
                    None => other = true,
                }
            }
            self.other.noise += u64::from(other);
        }
    }

    /// A key's counts; `None` when it is not counted by name (past `max_fields`).
    fn counts(&mut self, key: &str, max_fields: usize) -> Option<&mut FieldCounts> {
        if !self.fields.contains_key(key) && self.fields.len() >= max_fields {
            return None;
        }
        Some(self.fields.entry(key.to_owned()).or_default())
    }

    /// The counts of `key`: its own, or the other fields' when it is not counted by name.
    pub fn counts_of(&self, key: &str) -> FieldCounts {
        self.fields.get(key).copied().unwrap_or(self.other)
    }

    /// The verdict on `counts` (a field's at this endpoint), under `thresholds`.
    pub fn verdict(&self, counts: FieldCounts, thresholds: Thresholds) -> Verdict {
        let r = rate(counts.raw, self.compared);
        let n = rate(counts.noise, self.with_secondary);
        if r <= n * (1.0 + thresholds.relative) + thresholds.absolute {
            Verdict::Noise
        } else {
            Verdict::Differing
        }
    }

    /// The fields that differ more than noise, most often first, with their raw rates.
    pub fn differing(&self, thresholds: Thresholds) -> Vec<(&str, f64)> {
        let mut out: Vec<(&str, f64)> = self
            .fields
            .iter()
            .filter(|(_, c)| c.raw > 0 && self.verdict(**c, thresholds) == Verdict::Differing)
            .map(|(f, c)| (f.as_str(), rate(c.raw, self.compared)))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        out
    }
}

fn rate(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 / of as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{Change, FieldDiff};

    fn differences(fields: &[&str]) -> Differences {
        let mut d = Differences::default();
        for f in fields {
            d.push(
                FieldDiff {
                    field: (*f).to_owned(),
                    at: (*f).to_owned(),
                    change: Change::Value,
                },
                100,
            );
        }
        d
    }

    #[test]
    fn a_field_the_known_good_versions_disagree_on_is_noise() {
        let mut stats = EndpointStats::default();
        let t = Thresholds::default();
        for i in 0..100 {
            // /id and /ts differ everywhere (random); /price differs for the candidate only,
            // in a third of the copies; /items/*/qty differs twice in one copy.
            let mut raw = vec!["/id", "/ts", "/items/*/qty", "/items/*/qty"];
            if i % 3 == 0 {
                raw.push("/price");
            }
            stats.record(&differences(&raw), Some(&differences(&["/id", "/ts"])), 64);
        }
        let verdict = |f: &str| stats.verdict(stats.fields[f], t);
        assert_eq!(verdict("/id"), Verdict::Noise);
        assert_eq!(verdict("/ts"), Verdict::Noise);
        assert_eq!(verdict("/price"), Verdict::Differing);
        assert_eq!(stats.fields["/items/*/qty"].raw, 100, "once per copy");
        let differing = stats.differing(t);
        assert_eq!(differing.len(), 2);
        assert_eq!(differing[0], ("/items/*/qty", 1.0));
        assert!((differing[1].1 - 0.34).abs() < 1e-9, "{differing:?}");
    }

    #[test]
    fn without_a_secondary_every_frequent_difference_is_differing_and_fields_are_bounded() {
        let mut stats = EndpointStats::default();
        for i in 0..200 {
            let field = format!("/f{}", i % 10);
            let rare = if i == 0 { vec!["/rare"] } else { vec![] };
            let mut raw = vec![field.as_str()];
            raw.extend(rare);
            stats.record(&differences(&raw), None, 4);
        }
        // The first four names seen: /f0 and /rare (one copy), /f1, /f2; /f3 to /f9 after.
        let named: Vec<&str> = stats.fields.keys().map(String::as_str).collect();
        assert_eq!(named, ["/f0", "/f1", "/f2", "/rare"]);
        assert_eq!(stats.other.raw, 7 * 20, "once per copy");
        let t = Thresholds::default();
        assert_eq!(stats.verdict(stats.fields["/f0"], t), Verdict::Differing);
        assert_eq!(
            stats.verdict(stats.fields["/rare"], t),
            Verdict::Noise,
            "one copy in 200 is under the absolute threshold"
        );
    }
}
