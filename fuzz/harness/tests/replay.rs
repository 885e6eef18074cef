//! Replays every stored fuzz input on the stable toolchain: the corpus
//! (`fuzz/corpus/<target>/`) and the inputs that once failed
//! (`fuzz/regressions/<target>/`), through the same harness functions the
//! libFuzzer entry points call. A regression input that panics again fails
//! this test, naming the file.

use std::fs;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `dir` (none if it does not exist), sorted.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable folder").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_stored_input_passes_its_target() {
    let mut replayed = 0;
    for target in moat_fuzz::TARGETS {
        let mut files = inputs(&fuzz_dir().join("corpus").join(target.name));
        files.extend(inputs(&fuzz_dir().join("regressions").join(target.name)));
        assert!(!files.is_empty(), "no stored inputs for {}", target.name);
        for file in files {
            let data = fs::read(&file).expect("a readable input");
            let outcome = std::panic::catch_unwind(|| (target.run)(&data));
            assert!(
                outcome.is_ok(),
                "{} fails on {}",
                target.name,
                file.display()
            );
            replayed += 1;
        }
    }
    println!("replayed {replayed} inputs");
}

#[test]
fn every_stored_folder_names_a_target() {
    for kind in ["corpus", "regressions"] {
        for dir in fs::read_dir(fuzz_dir().join(kind)).expect("the folder exists") {
            let dir = dir.expect("a readable folder");
            let name = dir.file_name().into_string().expect("a UTF-8 name");
            assert!(
                moat_fuzz::target(&name).is_some(),
                "fuzz/{kind}/{name} names no target"
            );
        }
    }
}
