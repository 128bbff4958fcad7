//! The freeze planner: which filesystems a request freezes, in what order, and why not the rest.
//!
//! Input is the mount table (mountinfo) and the block topology; output is a [`Plan`] that lists
//! every mount inside the scope with its outcome and reason, and the filesystems to freeze in
//! dependency levels. The planner never touches a filesystem; the engine does.
//!
//! Invariants:
//! - A superblock is frozen at most once, through one of its mounts; its other mounts (bind
//!   mounts, btrfs subvolumes, the same device mounted twice) are reported `same-filesystem`.
//! - A superblock that is also mounted outside the scope is never frozen: freezing works on
//!   the whole superblock, so it would freeze what the scope promised to leave alone.
//! - A filesystem whose device is stored in a file on filesystem X gets a lower level than X:
//!   it is frozen before X and thawed after X. Freezing X first would stall the loop device's
//!   writeback and with it the freeze of the upper filesystem.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kmod_shim::mountinfo::Mount;
use kmod_shim::topology::Topology;
use kmod_shim::DevId;
use serde::{Deserialize, Serialize};

/// What to do with a local writable filesystem that cannot be frozen (vfat, FUSE, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CannotFreezePolicy {
    /// Report it and freeze the rest (the default: a vfat `/boot/efi` must not fail every backup).
    #[default]
    Skip,
    /// Fail the whole request before anything is frozen.
    Veto,
}

impl std::str::FromStr for CannotFreezePolicy {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s {
            "skip" => Ok(Self::Skip),
            "veto" => Ok(Self::Veto),
            _ => Err(PlanError::UnknownPolicy(s.to_string())),
        }
    }
}

/// Why a mount is not frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This mount is the one the engine freezes for its superblock.
    Freeze,
    /// Another mount of the same superblock is frozen.
    SameFilesystem { via: PathBuf },
    /// Left alone, with the reason.
    Skipped(String),
    /// A local writable filesystem without freeze support.
    CannotFreeze(String),
}

impl Outcome {
    /// The wire name used in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Freeze => "freeze",
            Outcome::SameFilesystem { .. } => "same-filesystem",
            Outcome::Skipped(_) => "skipped",
            Outcome::CannotFreeze(_) => "cannot-freeze",
        }
    }

    /// The human reason.
    pub fn reason(&self) -> String {
        match self {
            Outcome::Freeze => "local writable filesystem with freeze support".into(),
            Outcome::SameFilesystem { via } => format!("same filesystem as {} (frozen once)", via.display()),
            Outcome::Skipped(r) | Outcome::CannotFreeze(r) => r.clone(),
        }
    }
}

/// One mount inside the scope and what the plan does with it.
#[derive(Debug, Clone)]
pub struct PlannedMount {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub dev: DevId,
    pub outcome: Outcome,
    /// Freeze level (0 first); meaningful for `Freeze` only.
    pub level: u32,
}

/// Options that shape a plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Only mounts at or below this path are ever touched.
    pub scope: PathBuf,
    /// Mount points (and everything below them) never frozen.
    pub exclude: Vec<PathBuf>,
    /// Filesystem types never frozen.
    pub exclude_fstypes: Vec<String>,
    /// If not empty, only these mount points (and below) are frozen.
    pub include: Vec<PathBuf>,
    /// An explicit list from the request (`guest-fsfreeze-freeze-list`): exactly these.
    pub only: Option<Vec<PathBuf>>,
    /// Devices that must never be frozen (the one holding vssd's state directory).
    pub avoid_devs: Vec<DevId>,
}

impl PlanOptions {
    /// Unscoped defaults: everything under `scope`.
    pub fn new(scope: impl Into<PathBuf>) -> Self {
        PlanOptions {
            scope: scope.into(),
            exclude: vec![],
            exclude_fstypes: vec![],
            include: vec![],
            only: None,
            avoid_devs: vec![],
        }
    }
}

/// The result of planning.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Every mount inside the scope, in mount-table order.
    pub mounts: Vec<PlannedMount>,
    /// How many mounts lie outside the scope (not listed).
    pub outside_scope: usize,
    /// Indices into `mounts` of the filesystems to freeze, grouped by level, level 0 first.
    pub levels: Vec<Vec<usize>>,
}

impl Plan {
    /// The mounts that cannot be frozen.
    pub fn cannot_freeze(&self) -> impl Iterator<Item = &PlannedMount> {
        self.mounts.iter().filter(|m| matches!(m.outcome, Outcome::CannotFreeze(_)))
    }

    /// How many filesystems the plan freezes.
    pub fn freeze_count(&self) -> usize {
        self.levels.iter().map(Vec::len).sum()
    }
}

/// A request the planner refuses outright (or a policy name it does not know).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("`{0}` is not a cannot-freeze policy: use skip or veto")]
    UnknownPolicy(String),
    #[error("{0} is not a mount point (list mount points, as `findmnt` shows them)")]
    NotAMountPoint(String),
    #[error("{path} is outside vssd's scope {scope}; widen `scope` in the config to freeze it")]
    OutsideScope { path: String, scope: String },
}

/// Filesystems that hold no disk data: never frozen, never reported as a problem.
const PSEUDO: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "overlay",
    "pipefs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sockfs",
    "sysfs",
    "tmpfs",
    "tracefs",
    "rootfs",
    "nfsd",
    "squashfs",
    "erofs",
    "iso9660",
    "cramfs",
    "zonefs",
];

/// Filesystems whose data lives on another machine: freezing them here means nothing.
const NETWORK: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "9p",
    "virtiofs",
    "afs",
    "ncpfs",
    "lustre",
    "gpfs",
    "fuse.sshfs",
    "fuse.glusterfs",
    "fuse.s3fs",
    "fuse.rclone",
    "fuse.ceph-fuse",
    "fuse.gcsfuse",
];

/// Local filesystems known to lack FIFREEZE support (the kernel answers EOPNOTSUPP).
const NO_FREEZE: &[&str] = &[
    "vfat", "msdos", "fat", "exfat", "ntfs", "ntfs3", "hfs", "hfsplus", "udf", "minix", "fuseblk", "fuse", "ufs",
    "qnx4", "qnx6", "omfs", "bfs", "befs", "affs", "adfs", "sysv",
];

fn under(path: &Path, prefix: &Path) -> bool {
    path.starts_with(prefix)
}

/// Classifies a superblock's filesystem type: `None` means freezable.
fn classify_type(fstype: &str) -> Option<Outcome> {
    if PSEUDO.contains(&fstype) {
        let why = if fstype == "tmpfs" || fstype == "ramfs" {
            "pseudo: a memory filesystem, on no disk"
        } else if ["squashfs", "erofs", "iso9660", "cramfs"].contains(&fstype) {
            "read-only: a read-only filesystem type"
        } else {
            "pseudo: holds no disk data"
        };
        return Some(Outcome::Skipped(format!("{why} ({fstype})")));
    }
    if NETWORK.contains(&fstype) {
        return Some(Outcome::Skipped(format!("network: {fstype} keeps its data on another machine")));
    }
    if NO_FREEZE.contains(&fstype) || fstype.starts_with("fuse.") {
        return Some(Outcome::CannotFreeze(format!(
            "{fstype} has no freeze support: a snapshot of it is only crash-consistent"
        )));
    }
    None
}

/// Builds a plan from a mount table.
///
/// `backing` answers, for a freezable filesystem, the superblock device(s) that hold its
/// backing files (see [`backing_devs`]); it is a parameter so tests can describe stacks.
pub fn plan(mounts: &[Mount], opts: &PlanOptions, backing: &dyn Fn(&Mount) -> Vec<DevId>) -> Result<Plan, PlanError> {
    let scope = &opts.scope;
    if let Some(only) = &opts.only {
        for p in only {
            if !under(p, scope) {
                return Err(PlanError::OutsideScope {
                    path: p.display().to_string(),
                    scope: scope.display().to_string(),
                });
            }
            if !mounts.iter().any(|m| &m.mount_point == p) {
                return Err(PlanError::NotAMountPoint(p.display().to_string()));
            }
        }
    }

    // A mount point listed twice: the later mount hides the earlier one, which cannot be
    // reached by path (and so cannot be frozen through it).
    let mut last_at: HashMap<&Path, usize> = HashMap::new();
    for (i, m) in mounts.iter().enumerate() {
        last_at.insert(&m.mount_point, i);
    }
    let hidden = |i: usize| last_at.get(mounts[i].mount_point.as_path()) != Some(&i);

    // Group mounts by superblock.
    let mut groups: BTreeMap<DevId, Vec<usize>> = BTreeMap::new();
    for (i, m) in mounts.iter().enumerate() {
        groups.entry(m.dev).or_default().push(i);
    }

    let mut outcome: HashMap<usize, Outcome> = HashMap::new();
    let mut freeze_rep: Vec<usize> = Vec::new();
    for (dev, members) in &groups {
        let inside: Vec<usize> = members.iter().copied().filter(|&i| under(&mounts[i].mount_point, scope)).collect();
        if inside.is_empty() {
            continue;
        }
        let first = &mounts[inside[0]];
        let set = |o: Outcome, outcome: &mut HashMap<usize, Outcome>| {
            for &i in &inside {
                outcome.insert(i, o.clone());
            }
        };
        if let Some(&out) = members.iter().find(|&&i| !under(&mounts[i].mount_point, scope)) {
            set(
                Outcome::Skipped(format!(
                    "also-mounted-outside-scope: also mounted at {}, and freezing works on the whole filesystem",
                    mounts[out].mount_point.display()
                )),
                &mut outcome,
            );
            continue;
        }
        if let Some(o) = classify_type(&first.fstype) {
            set(o, &mut outcome);
            continue;
        }
        if first.superblock_read_only() || inside.iter().all(|&i| mounts[i].is_read_only()) {
            set(Outcome::Skipped("read-only: nothing can change it".into()), &mut outcome);
            continue;
        }
        if opts.avoid_devs.contains(dev) {
            set(Outcome::Skipped("state-dir: holds vssd's own state directory".into()), &mut outcome);
            continue;
        }
        if opts.exclude_fstypes.iter().any(|t| t == &first.fstype) {
            set(Outcome::Skipped(format!("excluded: fstype {} is in exclude-fstypes", first.fstype)), &mut outcome);
            continue;
        }
        if let Some(i) = inside.iter().find(|&&i| opts.exclude.iter().any(|e| under(&mounts[i].mount_point, e))) {
            set(
                Outcome::Skipped(format!("excluded: {} is in exclude", mounts[*i].mount_point.display())),
                &mut outcome,
            );
            continue;
        }
        if !opts.include.is_empty()
            && !inside.iter().any(|&i| opts.include.iter().any(|e| under(&mounts[i].mount_point, e)))
        {
            set(Outcome::Skipped("not-included: not in the configured include list".into()), &mut outcome);
            continue;
        }
        if let Some(only) = &opts.only {
            if !inside.iter().any(|&i| only.contains(&mounts[i].mount_point)) {
                set(Outcome::Skipped("not-listed: not in the request's list of mount points".into()), &mut outcome);
                continue;
            }
        }
        // Freeze through a reachable mount: the one the request named, else the first.
        let reachable: Vec<usize> = inside.iter().copied().filter(|&i| !hidden(i)).collect();
        let named = opts
            .only
            .as_ref()
            .and_then(|only| reachable.iter().copied().find(|&i| only.contains(&mounts[i].mount_point)));
        let Some(rep) = named.or_else(|| reachable.first().copied()) else {
            set(Outcome::Skipped("hidden: another mount sits on top of it at the same path".into()), &mut outcome);
            continue;
        };
        for &i in &inside {
            let o = if i == rep {
                Outcome::Freeze
            } else if hidden(i) {
                Outcome::Skipped("hidden: another mount sits on top of it at the same path".into())
            } else {
                Outcome::SameFilesystem { via: mounts[rep].mount_point.clone() }
            };
            outcome.insert(i, o);
        }
        freeze_rep.push(rep);
    }

    // Levels: an edge upper -> lower when upper's device is stored on lower's filesystem.
    let rep_of_dev: HashMap<DevId, usize> = freeze_rep.iter().map(|&i| (mounts[i].dev, i)).collect();
    let mut uppers_of: HashMap<usize, Vec<usize>> = HashMap::new();
    for &upper in &freeze_rep {
        for d in backing(&mounts[upper]) {
            if let Some(&lower) = rep_of_dev.get(&d) {
                if lower != upper {
                    uppers_of.entry(lower).or_default().push(upper);
                }
            }
        }
    }
    let mut level: HashMap<usize, u32> = HashMap::new();
    fn level_of(i: usize, uppers_of: &HashMap<usize, Vec<usize>>, memo: &mut HashMap<usize, u32>, depth: u32) -> u32 {
        if let Some(&l) = memo.get(&i) {
            return l;
        }
        // A cycle cannot exist in a real stack; the depth bound keeps a corrupt one finite.
        if depth > 64 {
            return 0;
        }
        let l = uppers_of
            .get(&i)
            .map(|ups| ups.iter().map(|&u| level_of(u, uppers_of, memo, depth + 1) + 1).max().unwrap_or(0))
            .unwrap_or(0);
        memo.insert(i, l);
        l
    }
    for &i in &freeze_rep {
        level_of(i, &uppers_of, &mut level, 0);
    }

    let mut planned = Vec::new();
    let mut index_of: HashMap<usize, usize> = HashMap::new();
    let mut outside_scope = 0;
    for (i, m) in mounts.iter().enumerate() {
        let Some(o) = outcome.remove(&i) else {
            outside_scope += 1;
            continue;
        };
        index_of.insert(i, planned.len());
        planned.push(PlannedMount {
            mount_point: m.mount_point.clone(),
            fstype: m.fstype.clone(),
            source: m.source.clone(),
            dev: m.dev,
            level: level.get(&i).copied().unwrap_or(0),
            outcome: o,
        });
    }
    let max_level = freeze_rep.iter().map(|i| level[i]).max();
    let mut levels = vec![Vec::new(); max_level.map_or(0, |l| l as usize + 1)];
    for &i in &freeze_rep {
        levels[level[&i] as usize].push(index_of[&i]);
    }
    for l in &mut levels {
        l.sort();
    }
    Ok(Plan { mounts: planned, outside_scope, levels })
}

/// The superblock devices that hold `m`'s backing files, looked up through sysfs.
///
/// The mount's source device (e.g. `/dev/loop3`; btrfs reports an anonymous device in
/// mountinfo, so the source is what leads to the loop device) is resolved to its backing
/// files; each file is matched to a mount by device number, and failing that (btrfs reports
/// per-subvolume device numbers to `stat`) by the longest mount point that contains it.
pub fn backing_devs(m: &Mount, mounts: &[Mount], topo: &Topology) -> Vec<DevId> {
    let mut devs = vec![m.dev];
    // Filesystems such as btrfs show an anonymous device in mountinfo; their block device is
    // the source. Others show the block device itself, and the stat can be spared.
    if m.dev.is_anonymous() && m.source.starts_with("/dev/") {
        if let Ok(st) = nix::sys::stat::stat(Path::new(&m.source)) {
            let rdev = DevId::from_raw(st.st_rdev);
            if rdev != m.dev {
                devs.push(rdev);
            }
        }
    }
    let mut out = Vec::new();
    for d in devs {
        if d.is_anonymous() {
            continue;
        }
        for file in topo.backing_files(d) {
            if let Some(dev) = holder_of(&file, mounts) {
                out.push(dev);
            }
        }
    }
    out
}

fn holder_of(file: &Path, mounts: &[Mount]) -> Option<DevId> {
    if let Ok(d) = kmod_shim::topology::dev_of(file) {
        if mounts.iter().any(|m| m.dev == d) {
            return Some(d);
        }
    }
    mounts
        .iter()
        .filter(|m| file.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmod_shim::mountinfo::parse;

    fn table() -> Vec<Mount> {
        parse(
            "\
1 0 252:1 / / rw,relatime - ext4 /dev/vda1 rw
2 1 0:21 / /proc rw - proc proc rw
3 1 0:30 / /run rw - tmpfs tmpfs rw
10 1 7:0 / /s/a rw - ext4 /dev/loop0 rw
11 1 7:1 / /s/b rw - xfs /dev/loop1 rw
12 1 0:45 / /s/c rw - btrfs /dev/loop2 rw,subvol=/
13 1 0:45 /sub /s/c-sub rw - btrfs /dev/loop2 rw,subvol=/sub
14 1 7:0 /dir /s/a-bind rw - ext4 /dev/loop0 rw
15 1 0:50 / /s/t rw - tmpfs tmpfs rw
16 1 7:3 / /s/ro ro - ext4 /dev/loop3 ro
17 1 0:51 / /s/fuse rw - fuse.fuse2fs /dev/loop4 rw
18 1 0:52 / /s/nfs rw - nfs4 srv:/x rw
19 1 7:5 / /s/nested rw - ext4 /dev/loop5 rw
20 1 7:6 / /s/out-inside rw - ext4 /dev/loop6 rw
21 1 7:6 / /elsewhere rw - ext4 /dev/loop6 rw
",
        )
        .unwrap()
    }

    fn no_backing(_: &Mount) -> Vec<DevId> {
        vec![]
    }

    fn outcome<'a>(p: &'a Plan, mp: &str) -> &'a Outcome {
        &p.mounts.iter().find(|m| m.mount_point == Path::new(mp)).unwrap_or_else(|| panic!("{mp} not planned")).outcome
    }

    #[test]
    fn only_mounts_inside_the_scope_are_listed() {
        let p = plan(&table(), &PlanOptions::new("/s"), &no_backing).unwrap();
        assert!(p.mounts.iter().all(|m| m.mount_point.starts_with("/s")));
        assert_eq!(p.outside_scope, 4);
    }

    #[test]
    fn scope_is_a_path_prefix_not_a_string_prefix() {
        let p = plan(&table(), &PlanOptions::new("/s/c"), &no_backing).unwrap();
        let listed: Vec<_> = p.mounts.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(listed, vec![PathBuf::from("/s/c")]);
        // /s/c-sub is the same btrfs, mounted outside /s/c: never frozen.
        assert!(matches!(outcome(&p, "/s/c"), Outcome::Skipped(r) if r.contains("also-mounted-outside-scope")));
    }

    #[test]
    fn one_freeze_per_superblock() {
        let p = plan(&table(), &PlanOptions::new("/s"), &no_backing).unwrap();
        assert_eq!(outcome(&p, "/s/a"), &Outcome::Freeze);
        assert_eq!(outcome(&p, "/s/a-bind"), &Outcome::SameFilesystem { via: "/s/a".into() });
        assert_eq!(outcome(&p, "/s/c"), &Outcome::Freeze);
        assert_eq!(outcome(&p, "/s/c-sub"), &Outcome::SameFilesystem { via: "/s/c".into() });
        assert_eq!(p.freeze_count(), 4, "{p:#?}"); // a, b, c, nested
    }

    #[test]
    fn pseudo_network_readonly_and_cannot_freeze_are_classified_with_reasons() {
        let p = plan(&table(), &PlanOptions::new("/s"), &no_backing).unwrap();
        assert!(matches!(outcome(&p, "/s/t"), Outcome::Skipped(r) if r.contains("pseudo")));
        assert!(matches!(outcome(&p, "/s/ro"), Outcome::Skipped(r) if r.contains("read-only")));
        assert!(matches!(outcome(&p, "/s/nfs"), Outcome::Skipped(r) if r.contains("network")));
        assert!(matches!(outcome(&p, "/s/fuse"), Outcome::CannotFreeze(r) if r.contains("fuse.fuse2fs")));
        assert_eq!(p.cannot_freeze().count(), 1);
    }

    #[test]
    fn a_superblock_also_mounted_outside_the_scope_is_never_frozen() {
        let p = plan(&table(), &PlanOptions::new("/s"), &no_backing).unwrap();
        assert!(matches!(outcome(&p, "/s/out-inside"), Outcome::Skipped(r) if r.contains("/elsewhere")));
    }

    #[test]
    fn exclude_covers_every_mount_of_the_superblock() {
        let mut o = PlanOptions::new("/s");
        o.exclude = vec!["/s/a-bind".into()];
        o.exclude_fstypes = vec!["xfs".into()];
        let p = plan(&table(), &o, &no_backing).unwrap();
        assert!(matches!(outcome(&p, "/s/a"), Outcome::Skipped(r) if r.contains("excluded")));
        assert!(matches!(outcome(&p, "/s/b"), Outcome::Skipped(r) if r.contains("xfs")));
    }

    #[test]
    fn include_list_limits_what_is_frozen() {
        let mut o = PlanOptions::new("/s");
        o.include = vec!["/s/b".into()];
        let p = plan(&table(), &o, &no_backing).unwrap();
        assert_eq!(p.freeze_count(), 1);
        assert_eq!(outcome(&p, "/s/b"), &Outcome::Freeze);
    }

    #[test]
    fn avoided_device_is_never_frozen() {
        let mut o = PlanOptions::new("/s");
        o.avoid_devs = vec!["7:1".parse().unwrap()];
        let p = plan(&table(), &o, &no_backing).unwrap();
        assert!(matches!(outcome(&p, "/s/b"), Outcome::Skipped(r) if r.contains("state-dir")));
    }

    #[test]
    fn explicit_list_freezes_exactly_those_and_through_the_named_mount() {
        let mut o = PlanOptions::new("/s");
        o.only = Some(vec!["/s/a-bind".into(), "/s/b".into()]);
        let p = plan(&table(), &o, &no_backing).unwrap();
        assert_eq!(p.freeze_count(), 2);
        assert_eq!(outcome(&p, "/s/a-bind"), &Outcome::Freeze);
        assert_eq!(outcome(&p, "/s/a"), &Outcome::SameFilesystem { via: "/s/a-bind".into() });
        assert!(matches!(outcome(&p, "/s/c"), Outcome::Skipped(r) if r.contains("not-listed")));
    }

    #[test]
    fn explicit_list_rejects_non_mount_points_and_paths_outside_scope() {
        let mut o = PlanOptions::new("/s");
        o.only = Some(vec!["/s/a/sub".into()]);
        assert_eq!(plan(&table(), &o, &no_backing).unwrap_err(), PlanError::NotAMountPoint("/s/a/sub".into()));
        o.only = Some(vec!["/".into()]);
        assert!(matches!(plan(&table(), &o, &no_backing).unwrap_err(), PlanError::OutsideScope { .. }));
    }

    #[test]
    fn a_filesystem_stored_on_another_is_frozen_first() {
        // /s/nested's image lives on /s/a; /s/a's image lives on /s/b.
        let backing = |m: &Mount| match m.mount_point.to_str().unwrap() {
            "/s/nested" => vec!["7:0".parse().unwrap()],
            "/s/a" => vec!["7:1".parse().unwrap()],
            _ => vec![],
        };
        let p = plan(&table(), &PlanOptions::new("/s"), &backing).unwrap();
        let lvl = |mp: &str| p.mounts.iter().find(|m| m.mount_point == Path::new(mp)).unwrap().level;
        assert_eq!(lvl("/s/nested"), 0);
        assert_eq!(lvl("/s/a"), 1);
        assert_eq!(lvl("/s/b"), 2);
        assert_eq!(lvl("/s/c"), 0);
        assert_eq!(p.levels.len(), 3);
        assert_eq!(p.levels[0].len(), 2);
    }

    #[test]
    fn a_mount_hidden_under_another_is_not_used() {
        let t = parse(
            "\
10 1 7:0 / /s/x rw - ext4 /dev/loop0 rw
11 1 7:1 / /s/x rw - ext4 /dev/loop1 rw
",
        )
        .unwrap();
        let p = plan(&t, &PlanOptions::new("/s"), &no_backing).unwrap();
        assert!(matches!(&p.mounts[0].outcome, Outcome::Skipped(r) if r.contains("hidden")));
        assert_eq!(p.mounts[1].outcome, Outcome::Freeze);
    }
}
