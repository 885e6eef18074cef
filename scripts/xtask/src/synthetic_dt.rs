//! Small device trees for the boot-failure tests: a QEMU-virt-shaped tree
//! with chosen parts left out, written with vm-fdt.

use anyhow::Result;
use vm_fdt::FdtWriter;

/// Which parts the tree has.
pub struct Parts {
    pub memory: bool,
    pub uart: bool,
    pub gic: bool,
}

/// A tree for QEMU virt with 1 GiB of RAM and one CPU, minus what `parts` leaves out.
pub fn virt_tree(parts: &Parts) -> Result<Vec<u8>> {
    let mut w = FdtWriter::new()?;
    let root = w.begin_node("")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_string("model", "synthetic virt")?;
    w.property_u32("interrupt-parent", 1)?;

    let chosen = w.begin_node("chosen")?;
    if parts.uart {
        w.property_string("stdout-path", "/pl011@9000000")?;
    }
    w.end_node(chosen)?;

    if parts.memory {
        let mem = w.begin_node("memory@40000000")?;
        w.property_string("device_type", "memory")?;
        w.property_array_u64("reg", &[0x4000_0000, 0x4000_0000])?;
        w.end_node(mem)?;
    }

    let cpus = w.begin_node("cpus")?;
    w.property_u32("#address-cells", 1)?;
    w.property_u32("#size-cells", 0)?;
    let cpu = w.begin_node("cpu@0")?;
    w.property_string("device_type", "cpu")?;
    w.property_string("compatible", "arm,cortex-a57")?;
    w.property_u32("reg", 0)?;
    w.property_string("enable-method", "psci")?;
    w.end_node(cpu)?;
    w.end_node(cpus)?;

    let psci = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        vec![
            "arm,psci-1.0".into(),
            "arm,psci-0.2".into(),
            "arm,psci".into(),
        ],
    )?;
    w.property_string("method", "smc")?;
    w.end_node(psci)?;

    if parts.gic {
        let gic = w.begin_node("intc@8000000")?;
        w.property_string("compatible", "arm,gic-v3")?;
        w.property_u32("#interrupt-cells", 3)?;
        w.property_null("interrupt-controller")?;
        w.property_u32("phandle", 1)?;
        w.property_array_u64("reg", &[0x0800_0000, 0x1_0000, 0x080a_0000, 0xf6_0000])?;
        w.end_node(gic)?;
    }

    if parts.uart {
        let uart = w.begin_node("pl011@9000000")?;
        w.property_string_list(
            "compatible",
            vec!["arm,pl011".into(), "arm,primecell".into()],
        )?;
        w.property_array_u64("reg", &[0x0900_0000, 0x1000])?;
        w.end_node(uart)?;
    }
    w.end_node(root)?;
    Ok(w.finish()?)
}
