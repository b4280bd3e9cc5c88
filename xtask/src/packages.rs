//! The system tools xtask needs, read from the one list the whole project shares (`.ci/packages`):
//! a tool, the Debian package that provides it, and the groups (`test`, `lab`, `run`, the bench
//! scripts) that need it.

/// The shared list, compiled in.
const PACKAGES: &str = include_str!("../../.ci/packages");

/// `(tool, package)` for every tool of `group`, in the file's order.
pub fn group(group: &str) -> Vec<(&'static str, &'static str)> {
    entries()
        .filter(|(_, _, groups)| groups.contains(&group))
        .map(|(tool, package, _)| (tool, package))
        .collect()
}

/// Every entry: tool, package, groups. Comment and blank lines are skipped.
pub fn entries() -> impl Iterator<Item = (&'static str, &'static str, Vec<&'static str>)> {
    PACKAGES
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let mut words = line.split_whitespace();
            let tool = words.next().unwrap_or_default();
            let package = words.next().unwrap_or_default();
            (tool, package, words.collect())
        })
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn every_entry_has_a_tool_a_package_and_a_group() {
        let mut n = 0;
        for (tool, package, groups) in entries() {
            n += 1;
            assert!(!tool.is_empty() && !package.is_empty(), "{tool} {package}");
            assert!(!groups.is_empty(), "{tool} belongs to no group");
        }
        assert!(n > 10);
    }

    #[test]
    fn the_groups_xtask_uses_are_not_empty() {
        for name in [
            "test", "lab", "run", "latency", "loopback", "http", "package",
        ] {
            assert!(!group(name).is_empty(), "group {name} is empty");
        }
        assert!(group("test").contains(&("sockperf", "sockperf")));
    }
}
