//! `cargo xtask abi-reference`: the book's ABI reference, written from the
//! `abi` crate's source.
//!
//! The `abi` crate declares every number that crosses a boundary once; this
//! module reads its declarations (hypercall ids, error codes, exit reasons,
//! service interfaces, with their doc comments) and writes
//! `book/src/abi-reference.md`. A unit test regenerates the page and fails
//! when the committed one differs, so the book cannot drift from the code.

use crate::tools;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::PathBuf;

/// The page, relative to the workspace.
pub const PAGE: &str = "book/src/abi-reference.md";

/// The `abi` sources read, in the order their calls are listed.
const SOURCES: [&str; 6] = [
    "abi/src/lib.rs",
    "abi/src/vm.rs",
    "abi/src/trap.rs",
    "abi/src/ipc.rs",
    "abi/src/service.rs",
    "abi/src/services.rs",
];

/// One declaration: its name, its value as written or computed, its docs.
#[derive(Debug, PartialEq)]
struct Item {
    name: String,
    value: String,
    doc: String,
}

/// One service interface of `service_interface!`.
#[derive(Debug, PartialEq)]
struct Service {
    name: String,
    id: String,
    doc: String,
    operations: Vec<Item>,
}

/// Writes the page.
pub fn write() -> Result<()> {
    let page = generate()?;
    let path = tools::root().join(PAGE);
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    println!("xtask: wrote {PAGE}");
    Ok(())
}

/// The page as the current `abi` source gives it.
pub fn generate() -> Result<String> {
    let mut hypercalls = Vec::new();
    let mut services = Vec::new();
    let mut errors = Vec::new();
    let mut exits = Vec::new();
    let mut vm_calls = String::new();
    for rel in SOURCES {
        let path: PathBuf = tools::root().join(rel);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let file = rel.trim_start_matches("abi/src/");
        if file == "vm.rs" {
            vm_calls = module_doc(&text);
        }
        hypercalls.extend(parse_hypercalls(&text).into_iter().map(|h| (file, h)));
        services.extend(parse_services(&text));
        if let Some(e) = parse_enum(&text, "Error") {
            errors = e;
        }
        if let Some(e) = parse_enum(&text, "ExitReason") {
            exits = e;
        }
    }
    anyhow::ensure!(!hypercalls.is_empty(), "no hypercall found in abi/src");
    anyhow::ensure!(!errors.is_empty(), "no `enum Error` found in abi/src");
    anyhow::ensure!(!exits.is_empty(), "no `enum ExitReason` found in abi/src");
    Ok(render(&hypercalls, &vm_calls, &errors, &exits, &services))
}

/// Doc-comment lines gathered above a declaration.
#[derive(Default)]
struct Docs(Vec<String>);

impl Docs {
    /// Feeds one line; returns true if it was a doc line or an attribute
    /// (both belong to the declaration that follows).
    fn feed(&mut self, line: &str) -> bool {
        if let Some(d) = line.strip_prefix("///") {
            self.0.push(d.trim().to_string());
            true
        } else {
            line.starts_with("#[")
        }
    }

    fn take(&mut self) -> String {
        let text = self.0.join(" ");
        self.0.clear();
        plain(&text)
    }
}

/// Rustdoc links become plain code spans, and table cells stay cells.
fn plain(doc: &str) -> String {
    unlink(doc).replace('|', "\\|")
}

/// Rustdoc links become plain code spans naming the item's last path
/// segment.
fn unlink(doc: &str) -> String {
    let mut out = String::new();
    let mut rest = doc;
    while let Some(start) = rest.find("[`") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("`]") else {
            break;
        };
        out.push_str(&rest[..start]);
        let path = &after[..end];
        let last = path.rsplit("::").next().unwrap_or(path);
        out.push('`');
        out.push_str(last);
        out.push('`');
        rest = &after[end + 2..];
        // `[`X`](target)`: the target goes.
        if rest.starts_with('(')
            && let Some(close) = rest.find(')')
        {
            rest = &rest[close + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// A file's `//!` documentation, links made plain (its tables kept).
fn module_doc(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    unlink(&lines.join("\n"))
}

/// `pub const NAME: u32 = id(N);` declarations: Moat's hypercall ids.
fn parse_hypercalls(text: &str) -> Vec<Item> {
    let mut docs = Docs::default();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if docs.feed(line) {
            continue;
        }
        let doc = docs.take();
        let Some(rest) = line.strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(": u32 = id(") else {
            continue;
        };
        let Some(number) = value.strip_suffix(");").and_then(parse_number) else {
            continue;
        };
        let Ok(number) = u16::try_from(number) else {
            continue;
        };
        out.push(Item {
            name: name.to_string(),
            value: format!("{:#010x}", moat_abi::hypercall::id(number)),
            doc,
        });
    }
    out
}

/// The variants `Name = value,` of `pub enum <name>`.
fn parse_enum(text: &str, name: &str) -> Option<Vec<Item>> {
    let header = format!("pub enum {name} {{");
    let mut lines = text.lines().map(str::trim);
    lines.by_ref().find(|l| *l == header)?;
    let mut docs = Docs::default();
    let mut out = Vec::new();
    for line in lines {
        if line == "}" {
            break;
        }
        if docs.feed(line) {
            continue;
        }
        let doc = docs.take();
        if let Some((variant, value)) = line.trim_end_matches(',').split_once(" = ") {
            out.push(Item {
                name: variant.to_string(),
                value: value.to_string(),
                doc,
            });
        }
    }
    Some(out)
}

/// The interfaces declared with `service_interface!`: `pub mod NAME: id = N {`
/// and its `K => fn op(Request) -> Reply;` lines.
fn parse_services(text: &str) -> Vec<Service> {
    let mut docs = Docs::default();
    let mut out: Vec<Service> = Vec::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if docs.feed(line) {
            continue;
        }
        let doc = docs.take();
        if let Some(rest) = line.strip_prefix("pub mod ")
            && let Some((name, id)) = rest.split_once(": id = ")
        {
            out.push(Service {
                name: name.to_string(),
                id: id.trim_end_matches(" {").to_string(),
                doc,
                operations: Vec::new(),
            });
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if line == "}" {
            inside = false;
            continue;
        }
        if let Some((op, signature)) = line.split_once(" => fn ")
            && let Some(service) = out.last_mut()
        {
            service.operations.push(Item {
                name: signature.trim_end_matches(';').to_string(),
                value: op.to_string(),
                doc,
            });
        }
    }
    out
}

fn parse_number(text: &str) -> Option<u64> {
    let t = text.replace('_', "");
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

fn render(
    hypercalls: &[(&str, Item)],
    vm_calls: &str,
    errors: &[Item],
    exits: &[Item],
    services: &[Service],
) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "# ABI reference\n\n\
         <!-- Written by `cargo xtask abi-reference` from the `abi` crate; a unit test\n\
         fails when this page and the crate differ. Edit the crate, then rerun. -->\n\n\
         Every number that crosses a boundary in Moat is declared once, in the `abi`\n\
         crate; this page is generated from it. Calls are SMCCC fast calls (SMC64/HVC64)\n\
         in the vendor-specific hypervisor range; x0 returns 0 or one of the error\n\
         codes below, and a call that fails changes nothing. The chapters\n\
         [Protected VMs](vms.md) and [Services and IPC](services.md) explain how the\n\
         calls are used.\n\n\
         ## Hypercalls\n\n\
         | function id | name | declared in | what it does |\n\
         |---|---|---|---|\n"
    );
    for (file, h) in hypercalls {
        let _ = writeln!(s, "| `{}` | `{}` | `{file}` | {} |", h.value, h.name, h.doc);
    }
    let _ = write!(
        s,
        "\n### Memory and VM calls: registers\n\n(From `vm.rs`.)\n\n{vm_calls}\n"
    );
    let _ = write!(
        s,
        "\nFunction numbers from `{:#x}` up to (not including) `{:#x}` are routed to\n\
         services by the image manifest; see [Services and IPC](services.md).\n\n\
         ## Error codes (x0)\n\n\
         | x0 | name | meaning |\n|---|---|---|\n",
        moat_abi::hypercall::SERVICE_RANGE_START,
        moat_abi::hypercall::SERVICE_RANGE_END
    );
    for e in errors {
        let _ = writeln!(s, "| {} | `{}` | {} |", e.value, e.name, e.doc);
    }
    let _ = write!(
        s,
        "\n## `VCPU_RUN` exits (x1)\n\n| x1 | reason | what the host learns |\n|---|---|---|\n"
    );
    for e in exits {
        let _ = writeln!(s, "| {} | `{}` | {} |", e.value, e.name, e.doc);
    }
    let _ = write!(
        s,
        "\n## Service interfaces\n\n\
         Each interface is declared once with `service_interface!`; the core calls a\n\
         service through the same typed client the service implements as a server.\n"
    );
    for svc in services {
        let _ = write!(
            s,
            "\n### `{}` (service id {})\n\n{}\n\n| operation | function | what it does |\n|---|---|---|\n",
            svc.name, svc.id, svc.doc
        );
        for op in &svc.operations {
            let _ = writeln!(s, "| {} | `{}` | {} |", op.value, op.name, op.doc);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_page_matches_the_abi_crate() {
        let committed = std::fs::read_to_string(tools::root().join(PAGE)).unwrap_or_default();
        let generated = generate().expect("the abi crate parses");
        assert!(
            committed == generated,
            "{PAGE} differs from the abi crate: run `cargo xtask abi-reference` and commit the page"
        );
    }

    #[test]
    fn every_moat_call_of_the_crate_is_listed() {
        let page = generate().expect("the abi crate parses");
        for id in [
            moat_abi::hypercall::NULL,
            moat_abi::hypercall::CHECK_CONSISTENCY,
            moat_abi::hypercall::LEDGER_RESTART,
            moat_abi::vm::VM_CREATE,
            moat_abi::vm::VCPU_RUN,
            moat_abi::vm::GUEST_UNSHARE_HOST,
        ] {
            assert!(page.contains(&format!("`{id:#010x}`")), "{id:#x} missing");
        }
        for e in moat_abi::Error::ALL {
            assert!(
                page.contains(&format!("| {} | `{e:?}` |", e.code())),
                "{e:?} missing"
            );
        }
        for r in moat_abi::vm::ExitReason::ALL {
            assert!(
                page.contains(&format!("| {} | `{r:?}` |", r as u64)),
                "{r:?} missing"
            );
        }
    }

    #[test]
    fn docs_lose_their_links() {
        assert_eq!(plain("an [`crate::Error`] code"), "an `Error` code");
        assert_eq!(plain("see [`VmFlags`]"), "see `VmFlags`");
        assert_eq!(plain("[`x`](crate::y) and a|b"), "`x` and a\\|b");
    }

    #[test]
    fn a_service_block_parses() {
        let text = "crate::service_interface! {\n    /// `t`: a test.\n    pub mod t: id = 9 {\n        /// Does a thing.\n        1 => fn go(u64) -> Empty;\n    }\n}\n";
        let s = parse_services(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "t");
        assert_eq!(s[0].id, "9");
        assert_eq!(s[0].doc, "`t`: a test.");
        assert_eq!(
            s[0].operations,
            vec![Item {
                name: "go(u64) -> Empty".into(),
                value: "1".into(),
                doc: "Does a thing.".into()
            }]
        );
    }
}
