//! Where maps and links are pinned, and pinning without a gap.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use std::os::fd::{AsFd, OwnedFd};

use super::{Error, link};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of one ambridge installation.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

/// This daemon's exclusive hold on the pins ([`Pins::own`]).
pub struct Owner {
    /// Unlocked when dropped.
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }

    /// Where the `sk_lookup` links of pod network namespaces are pinned,
    /// one per netns cookie.
    pub fn netns_links(&self) -> PathBuf {
        self.root.join("netns-links")
    }

    pub fn netns_link(&self, cookie: u64) -> PathBuf {
        self.netns_links().join(cookie.to_string())
    }

    /// Takes the pins for this daemon alone: an exclusive `flock` on the pin
    /// directory, held until the returned guard drops (or the process
    /// ends). While another daemon holds it (an upgrade overlap, or two by
    /// mistake), `waiting` is called once and this waits for it to exit:
    /// two daemons never reconcile the same maps or rebind the same sockets.
    pub fn own(&self, waiting: impl FnOnce()) -> Result<Owner, Error> {
        use nix::fcntl::{Flock, FlockArg};
        fs::create_dir_all(&self.root).map_err(|source| Error::Io {
            what: format!("create pin directory {}", self.root.display()),
            source,
        })?;
        let open = || {
            fs::File::open(&self.root).map_err(|source| Error::Io {
                what: format!("open {} to lock it", self.root.display()),
                source,
            })
        };
        let locked = |(_, errno): (fs::File, nix::errno::Errno)| Error::Io {
            what: format!("flock {}", self.root.display()),
            source: errno.into(),
        };
        match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(Owner { _lock: held }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                waiting();
                Flock::lock(open()?, FlockArg::LockExclusive)
                    .map(|held| Owner { _lock: held })
                    .map_err(locked)
            }
            Err(e) => Err(locked(e)),
        }
    }

    /// Creates the pin directories, checking they are on bpffs.
    pub fn create(&self) -> Result<(), Error> {
        for dir in [self.maps(), self.links(), self.netns_links()] {
            fs::create_dir_all(&dir).map_err(|source| Error::Io {
                what: format!("create pin directory {}", dir.display()),
                source,
            })?;
        }
        let fs = nix::sys::statfs::statfs(&self.root).map_err(|e| Error::Io {
            what: format!("statfs {}", self.root.display()),
            source: e.into(),
        })?;
        if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
            return Err(Error::NotBpffs {
                path: self.root.clone(),
            });
        }
        Ok(())
    }

    /// Pins `link` as `program`'s link, replacing an earlier pin in one
    /// rename: the old link stays attached until the new one is in place.
    pub fn pin_link(&self, program: &str, link: OwnedFd) -> Result<(), Error> {
        let path = self.link(program);
        // bpffs refuses names with a dot in them.
        let staging = self.links().join(format!("{program}_staging"));
        let _ = fs::remove_file(&staging);
        link::pin(link.as_fd(), &staging).map_err(|source| Error::Syscall {
            call: "bpf(BPF_OBJ_PIN)",
            what: format!("pin the link of {program} at {}", staging.display()),
            source,
        })?;
        fs::rename(&staging, &path).map_err(|source| Error::Io {
            what: format!("rename {} to {}", staging.display(), path.display()),
            source,
        })
    }

    /// Unpins every map not named in `keep` (maps of another layout
    /// version, which only programs no longer attached used), returning
    /// their names.
    pub fn remove_maps_except(&self, keep: &[&str]) -> Result<Vec<String>, Error> {
        let dir = self.maps();
        let entries = fs::read_dir(&dir).map_err(|source| Error::Io {
            what: format!("read {}", dir.display()),
            source,
        })?;
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Io {
                what: format!("read {}", dir.display()),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name.as_str()) {
                continue;
            }
            fs::remove_file(entry.path()).map_err(|source| Error::Io {
                what: format!("unpin {}", entry.path().display()),
                source,
            })?;
            removed.push(name);
        }
        removed.sort();
        Ok(removed)
    }

    /// Unlinks every pin in `dir`, returning their names.
    pub(super) fn remove_all_in(&self, dir: &Path) -> Result<Vec<String>, Error> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Io {
                    what: format!("read {}", dir.display()),
                    source,
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Io {
                what: format!("read {}", dir.display()),
                source,
            })?;
            fs::remove_file(entry.path()).map_err(|source| Error::Io {
                what: format!("unpin {}", entry.path().display()),
                source,
            })?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    pub(super) fn remove_dirs(&self) -> Result<(), Error> {
        for dir in [
            self.netns_links(),
            self.links(),
            self.maps(),
            self.root.clone(),
        ] {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        what: format!("remove {}", dir.display()),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}
