//! Reading vssd's JSON reports (`vssd-freeze`, `vssd-plan`): the entry of one mount, a field of
//! it; each accessor panics with the whole report when the thing asked for is missing.

use std::path::Path;

use serde_json::Value;

/// The per-mount entry of a vssd-freeze / vssd-plan report for `mountpoint`.
pub fn mount_entry<'a>(report: &'a Value, mountpoint: &Path) -> &'a Value {
    let mounts = report["mounts"].as_array().unwrap_or_else(|| panic!("report without mounts: {report}"));
    let want = mountpoint.to_str().unwrap();
    mounts
        .iter()
        .find(|m| m["mountpoint"].as_str() == Some(want))
        .unwrap_or_else(|| panic!("report has no entry for {want}: {report}"))
}

/// The string field `key` of a report entry (panics with the entry when absent).
pub fn field<'a>(entry: &'a Value, key: &str) -> &'a str {
    entry[key].as_str().unwrap_or_else(|| panic!("no string field {key:?} in {entry}"))
}

/// Path to a JSON string value.
pub fn p2s(p: &Path) -> Value {
    Value::String(p.to_str().unwrap().to_string())
}
