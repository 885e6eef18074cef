//! `cargo xtask size`: what the core's binary is made of.
//!
//! The core is the trusted computing base, and its size is a budget: the
//! flat binary firmware loads (text, read-only data and data; the BSS is
//! not in the file) against [`CORE_BUDGET`], each allocated section, and the
//! largest functions, which is where a cut pays.

use crate::boards::Board;
use crate::image;
use crate::tools::{self, llvm_tool};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::Command;

/// The size the core's flat binary should stay within.
pub const CORE_BUDGET: u64 = 96 * 1024;

/// How many of the largest functions to list.
const LARGEST: usize = 10;

/// One allocated section of the core's ELF.
#[derive(Debug, PartialEq)]
struct Section {
    name: String,
    bytes: u64,
}

/// One function of the core's ELF.
#[derive(Debug, PartialEq)]
struct Function {
    name: String,
    bytes: u64,
}

/// Builds the core and prints its sizes.
pub fn report() -> Result<()> {
    let elf = image::build_core(Board::Virt, &tools::target_dir())?;
    let bin = tools::target_dir().join("images/moat.bin");
    std::fs::create_dir_all(bin.parent().context("has a parent")?)?;
    image::objcopy(&elf, &bin)?;
    let file_bytes = std::fs::metadata(&bin)?.len();

    println!("core sections ({}):", elf.display());
    for s in sections(&elf)? {
        println!("  {:<14} {:>9} bytes", s.name, s.bytes);
    }
    println!("largest functions:");
    for f in largest_functions(&elf, LARGEST)? {
        println!("  {:>7} bytes  {}", f.bytes, f.name);
    }
    let verdict = if file_bytes <= CORE_BUDGET {
        "within".to_string()
    } else {
        format!("{} bytes over", file_bytes - CORE_BUDGET)
    };
    println!(
        "core_bytes: {file_bytes} ({:.1} KiB; flat binary, BSS excluded) — {verdict} the {} KiB budget",
        file_bytes as f64 / 1024.0,
        CORE_BUDGET / 1024
    );
    Ok(())
}

/// The allocated sections (those with an address), from `llvm-size -A`.
fn sections(elf: &Path) -> Result<Vec<Section>> {
    let out = Command::new(llvm_tool("llvm-size")?)
        .arg("-A")
        .arg(elf)
        .output()
        .context("running llvm-size")?;
    Ok(parse_sections(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_sections(text: &str) -> Vec<Section> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (name, bytes, addr) = (words.next()?, words.next()?, words.next()?);
            let bytes = bytes.parse().ok()?;
            let addr: u64 = addr.parse().ok()?;
            (name.starts_with('.') && addr != 0).then(|| Section {
                name: name.to_string(),
                bytes,
            })
        })
        .collect()
}

/// The `count` largest code symbols, from `llvm-nm --size-sort`.
fn largest_functions(elf: &Path, count: usize) -> Result<Vec<Function>> {
    let out = Command::new(llvm_tool("llvm-nm")?)
        .args(["--size-sort", "--print-size", "--demangle"])
        .arg(elf)
        .output()
        .context("running llvm-nm")?;
    let mut all = parse_functions(&String::from_utf8_lossy(&out.stdout));
    all.sort_by_key(|f| std::cmp::Reverse(f.bytes));
    all.truncate(count);
    Ok(all)
}

fn parse_functions(text: &str) -> Vec<Function> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.splitn(4, ' ');
            let (_addr, size, kind, name) =
                (words.next()?, words.next()?, words.next()?, words.next()?);
            if !matches!(kind, "t" | "T") {
                return None;
            }
            let bytes = u64::from_str_radix(size, 16).ok()?;
            Some(Function {
                name: strip_hash(name.trim()).to_string(),
                bytes,
            })
        })
        .collect()
}

/// Drops the `::h0123456789abcdef` disambiguator rustc appends.
fn strip_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            head
        }
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_keep_only_allocated_ones() {
        let text = "moat  :\nsection size addr\n.text 1000 1075838976\n.rodata 200 1076019200\n.debug_info 5000 0\nTotal 6200\n";
        assert_eq!(
            parse_sections(text),
            vec![
                Section {
                    name: ".text".into(),
                    bytes: 1000
                },
                Section {
                    name: ".rodata".into(),
                    bytes: 200
                },
            ]
        );
    }

    #[test]
    fn functions_are_code_symbols_without_hashes() {
        let text = "0000000040211000 0000000000008f00 T primary_main\n\
                    0000000040279000 0000000000100000 b moat::el2::heap::EARLY_POOL::hfcdbd2f522442eff\n\
                    0000000040206924 0000000000002a8c t moat::el2::hvc::handle_call::h14792266d4f1d706\n";
        assert_eq!(
            parse_functions(text),
            vec![
                Function {
                    name: "primary_main".into(),
                    bytes: 0x8f00
                },
                Function {
                    name: "moat::el2::hvc::handle_call".into(),
                    bytes: 0x2a8c
                },
            ]
        );
    }

    #[test]
    fn a_name_ending_in_h_and_words_keeps_them() {
        assert_eq!(strip_hash("a::hello"), "a::hello");
    }
}
