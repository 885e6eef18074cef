//! The bodies of Moat's fuzz targets.
//!
//! Each target takes the bytes libFuzzer (or a stored corpus file) hands it,
//! feeds them to one of Moat's parsers or checkers of hostile input, and
//! asserts what must hold for every input: no panic, and the property the
//! code exists for (a refused request changes nothing, a checked range lies
//! in RAM and does not wrap, a rewritten device tree still describes the
//! same machine, a parsed package rebuilds to the same package). A failed
//! assertion is a panic, which libFuzzer reports as a crash.
//!
//! The same functions run in two places: the libFuzzer entry points under
//! `fuzz/fuzz_targets/` (nightly, `cargo xtask fuzz`) and the corpus replay
//! in `tests/replay.rs` (stable, `cargo xtask test`), which runs every file
//! of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through them.
#![forbid(unsafe_code)]

mod checks;
mod devicetree;
mod images;
mod ledger;
mod traps;

/// One fuzz target: its name (the folder of its corpus and the binary
/// `cargo fuzz` builds) and its body.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "dt_discover",
        run: devicetree::discover,
    },
    Target {
        name: "hostdt_rewrite",
        run: devicetree::rewrite,
    },
    Target {
        name: "ledger_wire",
        run: ledger::wire,
    },
    Target {
        name: "txcheck",
        run: checks::transaction,
    },
    Target {
        name: "mapcheck",
        run: checks::leaf,
    },
    Target {
        name: "trap_decode",
        run: traps::decode,
    },
    Target {
        name: "manifest",
        run: images::manifest,
    },
    Target {
        name: "package",
        run: images::package,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}
