//! A writer for the "newc" cpio format, the one Linux unpacks as an
//! initramfs (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Every entry is a 110-byte ASCII header — the magic `070701` and thirteen
//! 8-digit hexadecimal fields — followed by the NUL-terminated name, padding
//! to a multiple of 4, the data, and padding to a multiple of 4 again. The
//! archive ends with an entry named `TRAILER!!!`.
//!
//! Archives are reproducible: every entry has owner 0:0 and mtime 0, and
//! inode numbers count up from 1 in the order entries are added.

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// An archive being written in memory.
#[derive(Debug)]
pub struct Writer {
    out: Vec<u8>,
    next_ino: u32,
}

/// The fields of one header that differ between entries.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl Writer {
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// A directory; `path` is relative to the archive's root (`dev`, `bin`).
    pub fn dir(&mut self, path: &str, perm: u32) -> &mut Self {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data)
    }

    /// A symbolic link: its data is the target, without a terminating NUL.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(
            TRAILER,
            &Header {
                ino: 0,
                mode: 0,
                nlink: 1,
                rdev: (0, 0),
            },
            0,
        );
        self.out
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> &mut Self {
        let path = path.trim_start_matches('/');
        assert!(
            !path.is_empty() && path != TRAILER,
            "cpio entry name {path:?} is reserved"
        );
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(
            path,
            &Header {
                ino,
                mode,
                nlink,
                rdev,
            },
            data.len(),
        );
        self.out.extend_from_slice(data);
        self.pad();
        self
    }

    fn header(&mut self, name: &str, h: &Header, size: usize) {
        let size = u32::try_from(size).expect("newc entries are at most 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("name fits");
        // Every entry belongs to root and is dated 1970; the archive is not
        // on a device; `check` is only used by the "070702" variant.
        let (uid, gid, mtime, devmajor, devminor, check) = (0, 0, 0, 0, 0, 0);
        self.out.extend_from_slice(MAGIC);
        for field in [
            h.ino, h.mode, uid, gid, h.nlink, mtime, size, devmajor, devminor, h.rdev.0, h.rdev.1,
            namesize, check,
        ] {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    /// Pads the archive to a multiple of 4 bytes. Headers start 4-aligned,
    /// so this aligns both the end of a name and the end of the data.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The magic and thirteen 8-digit fields.
    const HEADER_LEN: usize = 6 + 13 * 8;

    /// The 13 header fields of the entry starting at `at`, and its name.
    fn fields(archive: &[u8], at: usize) -> (Vec<u32>, String) {
        assert_eq!(&archive[at..at + 6], MAGIC);
        let f: Vec<u32> = (0..13)
            .map(|i| {
                let s = std::str::from_utf8(&archive[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            })
            .collect();
        let namesize = f[11] as usize;
        let name =
            std::str::from_utf8(&archive[at + HEADER_LEN..at + HEADER_LEN + namesize - 1]).unwrap();
        assert_eq!(
            archive[at + HEADER_LEN + namesize - 1],
            0,
            "name is NUL-terminated"
        );
        (f, name.to_string())
    }

    #[test]
    fn regular_file_byte_for_byte() {
        let mut w = Writer::new();
        w.file("init", 0o755, b"hello");
        let a = w.finish();
        let expected_header = concat!(
            "070701", "00000001", // ino
            "000081ed", // mode: S_IFREG | 0755
            "00000000", // uid
            "00000000", // gid
            "00000001", // nlink
            "00000000", // mtime
            "00000005", // filesize
            "00000000", // devmajor
            "00000000", // devminor
            "00000000", // rdevmajor
            "00000000", // rdevminor
            "00000005", // namesize: "init" and its NUL
            "00000000", // check
        );
        assert_eq!(&a[..HEADER_LEN], expected_header.as_bytes());
        // 110 + 5 = 115 bytes of header and name, padded to 116.
        assert_eq!(&a[110..116], b"init\0\0");
        // Data, then padding from 121 to 124.
        assert_eq!(&a[116..124], b"hello\0\0\0");
        // The trailer follows at once.
        let (f, name) = fields(&a, 124);
        assert_eq!(name, "TRAILER!!!");
        assert_eq!(f, vec![0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0]);
        // 124 + 110 + 11 = 245, padded to 248.
        assert_eq!(a.len(), 248);
        assert_eq!(&a[234..248], b"TRAILER!!!\0\0\0\0");
    }

    #[test]
    fn name_and_data_padding_at_every_remainder() {
        for name_len in 1..=8 {
            for data_len in 0..=8 {
                let name = "n".repeat(name_len);
                let data = vec![0xa5u8; data_len];
                let mut w = Writer::new();
                w.file(&name, 0o644, &data);
                let a = w.finish();
                let data_at = (HEADER_LEN + name_len + 1).next_multiple_of(4);
                assert_eq!(&a[data_at..data_at + data_len], &data[..]);
                assert!(a[HEADER_LEN + name_len..data_at].iter().all(|&b| b == 0));
                let next = (data_at + data_len).next_multiple_of(4);
                assert!(a[data_at + data_len..next].iter().all(|&b| b == 0));
                assert_eq!(fields(&a, next).1, "TRAILER!!!");
                assert_eq!(a.len() % 4, 0);
            }
        }
    }

    #[test]
    fn directories_links_and_devices() {
        let mut w = Writer::new();
        w.dir("/dev", 0o755)
            .char_device("dev/console", 0o600, 5, 1)
            .symlink("bin/sh", "busybox");
        let a = w.finish();

        let (f, name) = fields(&a, 0);
        assert_eq!(name, "dev", "a leading slash is dropped");
        assert_eq!((f[0], f[1], f[4], f[6]), (1, 0o040755, 2, 0));

        let at = (HEADER_LEN + 4).next_multiple_of(4);
        let (f, name) = fields(&a, at);
        assert_eq!(name, "dev/console");
        assert_eq!((f[0], f[1], f[6]), (2, 0o020600, 0));
        assert_eq!((f[9], f[10]), (5, 1), "rdevmajor and rdevminor");
        assert_eq!(
            (f[7], f[8]),
            (0, 0),
            "devmajor and devminor are the archive's, not the node's"
        );

        let at = at + (HEADER_LEN + 12).next_multiple_of(4);
        let (f, name) = fields(&a, at);
        assert_eq!(name, "bin/sh");
        assert_eq!((f[0], f[1], f[6]), (3, 0o120777, 7));
        let data_at = at + (HEADER_LEN + 7).next_multiple_of(4);
        assert_eq!(&a[data_at..data_at + 7], b"busybox");

        let at = data_at + 8;
        assert_eq!(fields(&a, at).1, "TRAILER!!!");
        assert_eq!(a.len(), at + (HEADER_LEN + 11).next_multiple_of(4));
    }

    #[test]
    fn archives_are_reproducible() {
        let build = || {
            let mut w = Writer::new();
            w.dir("proc", 0o755).file("init", 0o755, b"#!/bin/sh\n");
            w.finish()
        };
        assert_eq!(build(), build());
    }
}
