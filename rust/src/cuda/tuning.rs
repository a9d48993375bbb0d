//! Compile-time settings of the tensor-core kernels that a benchmark may change, so that
//! alternatives are timed side by side in one process (`--tune` of benches/bench_cuda_fused.py
//! and benches/bench_cuda.py):
//! `NATTEN_RS_TUNE="NAME=VALUE NAME=VALUE"`, each NAME one of `TUNABLES`. Read at each lookup, as
//! `NATTEN_RS_WGMMA` is, so a variant follows the variable; the settings are part of the variant's
//! key, so tuned and untuned variants live side by side. Unset, every setting is the kernels' own
//! choice (each is an `#ifndef` default in kernels/).

use super::kernels::{KernelKey, Source};
use crate::error::{Error, Result};

/// The environment variable that holds the settings.
pub const VARIABLE: &str = "NATTEN_RS_TUNE";

/// One setting: the macro it defines, the values it takes, and which variants read it.
pub struct Tunable {
    /// The macro (`-DNAME=VALUE`).
    pub name: &'static str,
    /// Its allowed values.
    pub values: &'static [u16],
    /// Whether variant `key` reads it (others compile the same without it, so take no define).
    applies: fn(&KernelKey) -> bool,
}

fn forward(key: &KernelKey) -> bool {
    key.source == Source::FusedTc
}

fn forward_mma_sync(key: &KernelKey) -> bool {
    forward(key) && !key.wgmma
}

fn window_products(key: &KernelKey) -> bool {
    key.source == Source::UnfusedTc
}

/// Every setting. Their meanings are in the kernels, beside their defaults.
pub const TUNABLES: [Tunable; 5] = [
    // Blocks per SM the forward's registers are bounded for (na_fused_tc.cu).
    Tunable {
        name: "NA_TC_FORWARD_MIN_BLOCKS",
        values: &[1, 2, 3, 4, 5, 6],
        applies: forward,
    },
    // Buffers of the mma.sync forward's ring of staged slabs (na_fused_tc.cu).
    Tunable {
        name: "NA_TC_FORWARD_STAGES",
        values: &[2, 3, 4],
        applies: forward_mma_sync,
    },
    // Keys per slab of the forward (na_fused_tc.cu); bulk tensor copies take the host's 64, so
    // a variant with them gives them up for this (`tuned`).
    Tunable {
        name: "NA_TC_KEYS",
        values: &[16, 32, 64],
        applies: forward,
    },
    // Whether the forward's running softmax reduces a slab's maxima and sums as trees rather
    // than in a chain (fused_tc.cuh).
    Tunable {
        name: "NA_TC_TREE_SOFTMAX",
        values: &[0, 1],
        applies: forward,
    },
    // Blocks per SM the unfused ops' window products are bounded for (na_unfused_tc.cu).
    Tunable {
        name: "NA_TC_UNFUSED_MIN_BLOCKS",
        values: &[1, 2, 3, 4, 5, 6],
        applies: window_products,
    },
];

/// Which settings a variant is compiled with: a value per `TUNABLES` entry, or `None` for the
/// kernels' own choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuning([Option<u16>; TUNABLES.len()]);

impl Tuning {
    /// The settings `NATTEN_RS_TUNE` holds (none where it is unset).
    pub fn from_env() -> Result<Tuning> {
        match std::env::var(VARIABLE) {
            Ok(text) => Tuning::parse(&text),
            Err(std::env::VarError::NotPresent) => Ok(Tuning::default()),
            Err(std::env::VarError::NotUnicode(text)) => {
                Err(invalid(format!("{text:?} (not UTF-8)")))
            }
        }
    }

    /// Settings from `text`: `NAME=VALUE` items separated by spaces or commas.
    pub fn parse(text: &str) -> Result<Tuning> {
        let mut tuning = Tuning::default();
        for item in text.split([' ', ',']).filter(|s| !s.is_empty()) {
            let (name, value) = item.split_once('=').ok_or_else(|| invalid(item))?;
            let index = TUNABLES
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| invalid(format!("{item} (unknown name {name})")))?;
            let allowed = TUNABLES[index].values;
            let value = value
                .parse::<u16>()
                .ok()
                .filter(|v| allowed.contains(v))
                .ok_or_else(|| invalid(format!("{item} ({name} takes {allowed:?})")))?;
            tuning.0[index] = Some(value);
        }
        Ok(tuning)
    }

    /// The settings variant `key` reads.
    pub fn for_key(self, key: &KernelKey) -> Tuning {
        let mut kept = Tuning::default();
        for (i, tunable) in TUNABLES.iter().enumerate() {
            if (tunable.applies)(key) {
                kept.0[i] = self.0[i];
            }
        }
        kept
    }

    /// The value of setting `name`, if set.
    pub fn get(&self, name: &str) -> Option<u16> {
        let index = TUNABLES.iter().position(|t| t.name == name)?;
        self.0[index]
    }

    /// `(name, value)` of each setting made.
    pub fn settings(&self) -> impl Iterator<Item = (&'static str, u16)> + '_ {
        TUNABLES
            .iter()
            .zip(self.0)
            .filter_map(|(t, v)| v.map(|v| (t.name, v)))
    }
}

fn invalid(got: impl Into<String>) -> Error {
    let names: Vec<&str> = TUNABLES.iter().map(|t| t.name).collect();
    Error::invalid(
        VARIABLE,
        format!(
            "NAME=VALUE settings separated by spaces or commas, NAME one of {}",
            names.join(", ")
        ),
        got,
    )
}

/// Variant `key` with the settings of `NATTEN_RS_TUNE` that it reads (`Tuning::apply`).
pub fn tuned(key: KernelKey) -> Result<KernelKey> {
    Ok(Tuning::from_env()?.apply(key))
}

impl Tuning {
    /// Variant `key` with the settings it reads. One whose keys per slab are set stages its
    /// slabs by cp.async: the bulk copies' tensor maps are shaped by the host for the default
    /// slab.
    pub fn apply(self, key: KernelKey) -> KernelKey {
        let tuning = self.for_key(&key);
        let tma = key.tma && tuning.get("NA_TC_KEYS").is_none();
        KernelKey { tuning, tma, ..key }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlpack::DType;

    fn key(source: Source, wgmma: bool, tma: bool) -> KernelKey {
        let plain = KernelKey::stride_one(source, DType::BF16, [1, 7, 7], [false; 3], (32, 32));
        KernelKey {
            wgmma,
            tma,
            ..plain
        }
    }

    #[test]
    fn settings_parse_separated_by_spaces_or_commas() {
        let tuning = Tuning::parse(" NA_TC_KEYS=32,NA_TC_FORWARD_MIN_BLOCKS=4  ").unwrap();
        assert_eq!(tuning.get("NA_TC_KEYS"), Some(32));
        assert_eq!(tuning.get("NA_TC_FORWARD_MIN_BLOCKS"), Some(4));
        assert_eq!(tuning.get("NA_TC_TREE_SOFTMAX"), None);
        assert_eq!(Tuning::parse("").unwrap(), Tuning::default());
    }

    #[test]
    fn bad_settings_are_refused_naming_the_variable() {
        for (text, got) in [
            ("NA_TC_KEYS", "NA_TC_KEYS"),
            ("NA_TC_KEYS=48", "NA_TC_KEYS takes [16, 32, 64]"),
            ("NA_TC_KEYS=-1", "NA_TC_KEYS takes"),
            ("NA_TC_BOGUS=1", "unknown name NA_TC_BOGUS"),
        ] {
            let message = Tuning::parse(text).unwrap_err().to_string();
            assert!(message.contains(VARIABLE), "{message}");
            assert!(message.contains(got), "{text}: {message}");
        }
    }

    #[test]
    fn a_variant_takes_only_the_settings_it_reads() {
        let tuning = Tuning::parse("NA_TC_FORWARD_STAGES=4 NA_TC_TREE_SOFTMAX=1").unwrap();
        let forward = tuning.apply(key(Source::FusedTc, false, false));
        assert_eq!(forward.tuning, tuning);
        let defines = forward.defines();
        assert!(
            defines.contains(&"-DNA_TC_FORWARD_STAGES=4".to_string()),
            "{defines:?}"
        );
        assert!(
            defines.contains(&"-DNA_TC_TREE_SOFTMAX=1".to_string()),
            "{defines:?}"
        );
        assert!(
            forward.name().contains("NA_TC_FORWARD_STAGES=4"),
            "{}",
            forward.name()
        );
        // The warpgroup forward has no ring of that kind; other sources read neither.
        let warpgroup = tuning.apply(key(Source::FusedTc, true, false));
        assert_eq!(warpgroup.tuning.get("NA_TC_FORWARD_STAGES"), None);
        assert_eq!(warpgroup.tuning.get("NA_TC_TREE_SOFTMAX"), Some(1));
        let backward = key(Source::FusedBwdTc, false, false);
        assert_eq!(tuning.apply(backward), backward);
        let unfused = Tuning::parse("NA_TC_KEYS=32 NA_TC_UNFUSED_MIN_BLOCKS=4").unwrap();
        let products = unfused.apply(key(Source::UnfusedTc, false, false));
        assert_eq!(
            products.tuning.settings().collect::<Vec<_>>(),
            [("NA_TC_UNFUSED_MIN_BLOCKS", 4)]
        );
    }

    #[test]
    fn slabs_of_other_sizes_give_up_the_bulk_copies() {
        let bulk = key(Source::FusedTc, true, true);
        assert!(
            Tuning::parse("NA_TC_TREE_SOFTMAX=1")
                .unwrap()
                .apply(bulk)
                .tma
        );
        assert!(!Tuning::parse("NA_TC_KEYS=32").unwrap().apply(bulk).tma);
    }

    #[test]
    fn every_setting_is_a_default_the_kernels_define() {
        let sources: String = super::super::kernels::HEADERS
            .iter()
            .map(|(_, text)| *text)
            .chain([Source::FusedTc.text(), Source::UnfusedTc.text()])
            .collect();
        for tunable in &TUNABLES {
            let guard = format!("#ifndef {}\n", tunable.name);
            assert!(sources.contains(&guard), "no {guard:?} in the kernels");
        }
    }
}
