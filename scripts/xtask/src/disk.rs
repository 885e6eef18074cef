//! The disk `--disk FILE` attaches: a small FAT image the xtask makes
//! itself when FILE does not exist, holding one file with a known line, so
//! that a host can read a file from a PCIe block device, write one and
//! read it back.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// The file the image holds, and its contents.
pub const FILE_NAME: &str = "hello.txt";
pub const FILE_TEXT: &str = "a file on a virtio-blk disk behind the SMMU\n";
/// The image's size: FAT16's smallest comfortable volume.
const SIZE: u64 = 16 << 20;

/// Makes `path` a FAT image holding [`FILE_NAME`], unless it exists.
pub fn ensure(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    make(path).with_context(|| format!("making the disk image {}", path.display()))
}

/// Writes a fresh FAT image holding [`FILE_NAME`] to `path`.
pub fn make(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(SIZE)?;
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new().volume_label(*b"MOATDISK   "),
    )?;
    let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new())?;
    fs.root_dir()
        .create_file(FILE_NAME)?
        .write_all(FILE_TEXT.as_bytes())?;
    fs.unmount()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_image_holds_the_file() {
        let path = std::env::temp_dir().join(format!("moat-disk-{}.img", std::process::id()));
        make(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        let mut text = String::new();
        fs.root_dir()
            .open_file(FILE_NAME)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, FILE_TEXT);
        drop(fs);
        std::fs::remove_file(&path).unwrap();
    }
}
