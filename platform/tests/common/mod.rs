//! Helpers shared by the integration tests: loading the trees in `testdata/`,
//! building small trees with vm-fdt, and an independent reader that flattens
//! a tree into node paths and properties for comparisons.
#![allow(dead_code)]

use vm_fdt::FdtWriter;

/// The bytes of `testdata/<name>`.
pub fn load(name: &str) -> Vec<u8> {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

/// The real trees kept in `testdata/`.
pub const REAL_TREES: [&str; 5] = [
    "qemu-virt-gicv3.dtb",
    "qemu-virt-gicv2.dtb",
    "fvp-base-revc.dtb",
    "bcm2711-rpi-4-b.dtb",
    "qemu-raspi4b.dtb",
];

pub fn be32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_be_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

pub fn be64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_be_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

/// Header word `index` (1 = totalsize, 2 = off_dt_struct, ...).
pub fn header(dtb: &[u8], index: usize) -> u32 {
    be32(dtb, index * 4)
}

/// A node as the flattening reader sees it: its full path and its properties
/// in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatNode {
    pub path: String,
    pub properties: Vec<(String, Vec<u8>)>,
}

impl FlatNode {
    pub fn property(&self, name: &str) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Every node of a well-formed tree, in order, skipping NOP tokens.
pub fn flatten(dtb: &[u8]) -> Vec<FlatNode> {
    let structs = header(dtb, 2) as usize;
    let strings = header(dtb, 3) as usize;
    let mut offset = structs;
    let mut path: Vec<String> = Vec::new();
    let mut nodes: Vec<FlatNode> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    loop {
        let token = be32(dtb, offset);
        offset += 4;
        match token {
            1 => {
                let end = offset + dtb[offset..].iter().position(|&b| b == 0).unwrap();
                let name = std::str::from_utf8(&dtb[offset..end]).unwrap().to_string();
                offset = (end + 1 + 3) & !3;
                path.push(name);
                let full = if path.len() == 1 {
                    "/".to_string()
                } else {
                    path[1..].join("/")
                };
                let full = if full == "/" {
                    full
                } else {
                    format!("/{full}")
                };
                open.push(nodes.len());
                nodes.push(FlatNode {
                    path: full,
                    properties: Vec::new(),
                });
            }
            2 => {
                path.pop();
                open.pop();
            }
            3 => {
                let len = be32(dtb, offset) as usize;
                let name_offset = strings + be32(dtb, offset + 4) as usize;
                let name_end =
                    name_offset + dtb[name_offset..].iter().position(|&b| b == 0).unwrap();
                let name = std::str::from_utf8(&dtb[name_offset..name_end])
                    .unwrap()
                    .to_string();
                let value = dtb[offset + 8..offset + 8 + len].to_vec();
                offset = (offset + 8 + len + 3) & !3;
                nodes[*open.last().unwrap()].properties.push((name, value));
            }
            4 => {}
            9 => return nodes,
            other => panic!("unknown token {other}"),
        }
    }
}

/// Where every property value lies in the tree: `(offset, len)` pairs.
pub fn property_values(dtb: &[u8]) -> Vec<(usize, usize)> {
    let mut offset = header(dtb, 2) as usize;
    let mut values = Vec::new();
    loop {
        let token = be32(dtb, offset);
        offset += 4;
        match token {
            1 => {
                offset = (offset + dtb[offset..].iter().position(|&b| b == 0).unwrap() + 1 + 3) & !3
            }
            3 => {
                let len = be32(dtb, offset) as usize;
                values.push((offset + 8, len));
                offset = (offset + 8 + len + 3) & !3;
            }
            9 => return values,
            _ => {}
        }
    }
}

/// How many NOP tokens the structure block holds.
pub fn nop_tokens(dtb: &[u8]) -> usize {
    let mut offset = header(dtb, 2) as usize;
    let mut nops = 0;
    loop {
        let token = be32(dtb, offset);
        offset += 4;
        match token {
            1 => {
                offset = (offset + dtb[offset..].iter().position(|&b| b == 0).unwrap() + 1 + 3) & !3
            }
            3 => offset = (offset + 8 + be32(dtb, offset) as usize + 3) & !3,
            4 => nops += 1,
            9 => return nops,
            _ => {}
        }
    }
}

/// The `/memreserve/` entries.
pub fn memreserve(dtb: &[u8]) -> Vec<(u64, u64)> {
    let mut offset = header(dtb, 4) as usize;
    let mut entries = Vec::new();
    loop {
        let (address, size) = (be64(dtb, offset), be64(dtb, offset + 8));
        if address == 0 && size == 0 {
            return entries;
        }
        entries.push((address, size));
        offset += 16;
    }
}

/// The same tree with a NOP token after every token of the structure block
/// except `FDT_END`, the way libfdt leaves a tree it has deleted things from.
pub fn with_nops(dtb: &[u8]) -> Vec<u8> {
    let structs = header(dtb, 2) as usize;
    let struct_size = header(dtb, 9) as usize;
    let mut out_struct = Vec::new();
    let mut offset = structs;
    loop {
        let token = be32(dtb, offset);
        let next = match token {
            1 => {
                let end = offset + 4 + dtb[offset + 4..].iter().position(|&b| b == 0).unwrap();
                (end + 1 + 3) & !3
            }
            3 => {
                let len = be32(dtb, offset + 4) as usize;
                (offset + 12 + len + 3) & !3
            }
            _ => offset + 4,
        };
        out_struct.extend_from_slice(&dtb[offset..next]);
        if token == 9 {
            break;
        }
        out_struct.extend_from_slice(&4u32.to_be_bytes());
        offset = next;
    }
    assert!(offset < structs + struct_size);
    // Header and reservation map, then the new structure block, then strings.
    let strings = &dtb[header(dtb, 3) as usize..][..header(dtb, 8) as usize];
    let mut out = dtb[..structs].to_vec();
    let new_struct_offset = out.len();
    out.extend_from_slice(&out_struct);
    let new_strings_offset = out.len();
    out.extend_from_slice(strings);
    let total = out.len() as u32;
    out[4..8].copy_from_slice(&total.to_be_bytes());
    out[8..12].copy_from_slice(&(new_struct_offset as u32).to_be_bytes());
    out[12..16].copy_from_slice(&(new_strings_offset as u32).to_be_bytes());
    out[36..40].copy_from_slice(&(out_struct.len() as u32).to_be_bytes());
    out
}

/// A tree whose root has `#address-cells = <2>` and `#size-cells = <2>`, with
/// the children `body` writes.
pub fn tree(body: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
    tree_with_root_cells(2, 2, body)
}

pub fn tree_with_root_cells(
    address_cells: u32,
    size_cells: u32,
    body: impl FnOnce(&mut FdtWriter),
) -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_string("model", "test board").unwrap();
    w.property_string_list("compatible", vec!["test,board".into(), "test,soc".into()])
        .unwrap();
    w.property_u32("#address-cells", address_cells).unwrap();
    w.property_u32("#size-cells", size_cells).unwrap();
    body(&mut w);
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

/// `reg` cells for 2/2 parents.
pub fn reg2(entries: &[(u64, u64)]) -> Vec<u64> {
    entries
        .iter()
        .flat_map(|&(base, size)| [base, size])
        .collect()
}

pub fn node(w: &mut FdtWriter, name: &str, body: impl FnOnce(&mut FdtWriter)) {
    let handle = w.begin_node(name).unwrap();
    body(w);
    w.end_node(handle).unwrap();
}

pub fn memory(w: &mut FdtWriter, name: &str, banks: &[(u64, u64)]) {
    node(w, name, |w| {
        w.property_string("device_type", "memory").unwrap();
        w.property_array_u64("reg", &reg2(banks)).unwrap();
    });
}

/// `/cpus` with `count` PSCI CPUs whose MPIDRs are 0, 1, ...
pub fn cpus(w: &mut FdtWriter, count: u32) {
    node(w, "cpus", |w| {
        w.property_u32("#address-cells", 1).unwrap();
        w.property_u32("#size-cells", 0).unwrap();
        for index in 0..count {
            node(w, &format!("cpu@{index:x}"), |w| {
                w.property_string("device_type", "cpu").unwrap();
                w.property_string("compatible", "arm,cortex-a53").unwrap();
                w.property_u32("reg", index).unwrap();
                w.property_string("enable-method", "psci").unwrap();
            });
        }
    });
}

pub fn pl011(w: &mut FdtWriter, base: u64, status: Option<&str>) {
    node(w, &format!("serial@{base:x}"), |w| {
        w.property_string_list(
            "compatible",
            vec!["arm,pl011".into(), "arm,primecell".into()],
        )
        .unwrap();
        w.property_array_u64("reg", &[base, 0x1000]).unwrap();
        if let Some(status) = status {
            w.property_string("status", status).unwrap();
        }
    });
}

pub fn gicv3(w: &mut FdtWriter) {
    node(w, "interrupt-controller@8000000", |w| {
        w.property_string("compatible", "arm,gic-v3").unwrap();
        w.property_array_u64(
            "reg",
            &reg2(&[(0x800_0000, 0x1_0000), (0x80a_0000, 0xf6_0000)]),
        )
        .unwrap();
    });
}

pub fn psci(w: &mut FdtWriter, method: &str) {
    node(w, "psci", |w| {
        w.property_string("compatible", "arm,psci-1.0").unwrap();
        w.property_string("method", method).unwrap();
    });
}

/// Memory, two CPUs, a PL011, a GICv3 and PSCI: everything discovery needs.
pub fn complete(w: &mut FdtWriter) {
    memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
    cpus(w, 2);
    pl011(w, 0x900_0000, None);
    gicv3(w);
    psci(w, "smc");
}

/// A deterministic xorshift64 generator.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}
