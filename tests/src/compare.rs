//! Comparing two agents' replies (vssd's and qemu-ga's) and listing every difference.
//!
//! [`Compare::diff`] walks both JSON values together and returns one line per difference,
//! each naming where it is as a path into the reply and both sides' values:
//!
//! ```text
//! [2].disk[0].pci-controller.slot: vssd 5, qemu-ga 6
//! [1].ip-addresses[0].prefix: vssd (missing), qemu-ga 64
//! ```
//!
//! Objects always have to have the same keys, and every value the same JSON type (integer,
//! float, string, bool, null, array, object), recursively. Values are compared too unless a
//! rule for their path says otherwise: [`Check::Shape`] (only keys and types: counters, free
//! space) or [`Check::Near`] (numbers within a tolerance: clocks). Rules name a path with its
//! indexes left out (`[].disk[].serial`) and apply to everything below it; the longest rule
//! that matches wins.
//!
//! Arrays are compared element by element in order, or, with a key ([`Compare::key`]), by
//! matching the elements that have the same value of that member (the mounts by mountpoint,
//! the interfaces by name): a missing or extra element is one difference, not a cascade, and a
//! different order is one more. Paths use the index in the first (vssd's) reply.

use serde_json::Value;

/// How the values at a path are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// Same keys, types and values (the default).
    Equal,
    /// Same keys and types; the values may differ.
    Shape,
    /// Numbers within this much of each other; everything else as [`Check::Equal`].
    Near(f64),
}

/// A comparison of two replies: its rules and the names of the two sides.
#[derive(Debug, Clone)]
pub struct Compare {
    left: String,
    right: String,
    checks: Vec<(String, Check)>,
    keys: Vec<(String, String)>,
    numbers_alike: bool,
}

impl Default for Compare {
    fn default() -> Self {
        Compare::new("vssd", "qemu-ga")
    }
}

impl Compare {
    /// A comparison of `left`'s replies with `right`'s (the names the differences print).
    pub fn new(left: &str, right: &str) -> Compare {
        Compare { left: left.into(), right: right.into(), checks: Vec::new(), keys: Vec::new(), numbers_alike: false }
    }

    /// Compares what is at `path` (indexes left out, e.g. `[].statistics`; `""` is the whole
    /// reply) and below it with `check`.
    pub fn check(mut self, path: &str, check: Check) -> Compare {
        self.checks.push((path.into(), check));
        self
    }

    /// Matches the elements of the array at `path` by their member `key` instead of their order.
    pub fn key(mut self, path: &str, key: &str) -> Compare {
        self.keys.push((path.into(), key.into()));
        self
    }

    /// Takes integers and floats as one type, comparing their values as numbers: QEMU prints
    /// an integral double as an integer (`1700000000`), serde a float as `1700000000.0`.
    pub fn numbers_alike(mut self) -> Compare {
        self.numbers_alike = true;
        self
    }

    /// Every difference between `left` and `right`, one line each.
    pub fn diff(&self, left: &Value, right: &Value) -> Vec<String> {
        let mut out = Vec::new();
        self.walk(left, right, "", "", &mut out);
        out
    }

    fn rule(&self, generic: &str) -> Check {
        self.checks
            .iter()
            .filter(|(p, _)| covers(p, generic))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, c)| *c)
            .unwrap_or(Check::Equal)
    }

    fn walk(&self, l: &Value, r: &Value, path: &str, generic: &str, out: &mut Vec<String>) {
        let (tl, tr) = (type_name(l), type_name(r));
        let numbers = self.numbers_alike && l.is_number() && r.is_number();
        if tl != tr && !numbers {
            out.push(format!("{}: {} {tl} {}, {} {tr} {}", show(path), self.left, short(l), self.right, short(r)));
            return;
        }
        match (l, r) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, va) in a {
                    let p = join(path, k);
                    match b.get(k) {
                        Some(vb) => self.walk(va, vb, &p, &join(generic, k), out),
                        None => out.push(format!("{p}: {} {}, {} (missing)", self.left, short(va), self.right)),
                    }
                }
                for (k, vb) in b {
                    if !a.contains_key(k) {
                        out.push(format!("{}: {} (missing), {} {}", join(path, k), self.left, self.right, short(vb)));
                    }
                }
            }
            (Value::Array(a), Value::Array(b)) => self.walk_array(a, b, path, generic, out),
            _ => {
                let same = match self.rule(generic) {
                    Check::Equal if numbers => l.as_f64() == r.as_f64(),
                    Check::Equal => l == r,
                    Check::Shape => true,
                    Check::Near(tol) => match (l.as_f64(), r.as_f64()) {
                        (Some(x), Some(y)) => (x - y).abs() <= tol,
                        _ => l == r,
                    },
                };
                if !same {
                    out.push(format!("{}: {} {}, {} {}", show(path), self.left, short(l), self.right, short(r)));
                }
            }
        }
    }

    fn walk_array(&self, a: &[Value], b: &[Value], path: &str, generic: &str, out: &mut Vec<String>) {
        let elem = format!("{generic}[]");
        let key = self.keys.iter().find(|(p, _)| p == generic).map(|(_, k)| k.as_str());
        let Some(key) = key else {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                self.walk(x, y, &format!("{path}[{i}]"), &elem, out);
            }
            if a.len() != b.len() && self.rule(&elem) != Check::Shape {
                out.push(format!(
                    "{}: {} has {} elements, {} has {}",
                    show(path),
                    self.left,
                    a.len(),
                    self.right,
                    b.len()
                ));
            }
            return;
        };
        let key_of = |v: &Value| v.get(key).map(|k| k.to_string()).unwrap_or_else(|| "(no key)".into());
        let ka: Vec<String> = a.iter().map(key_of).collect();
        let kb: Vec<String> = b.iter().map(key_of).collect();
        for (i, x) in a.iter().enumerate() {
            match kb.iter().position(|k| *k == ka[i]) {
                Some(j) => self.walk(x, &b[j], &format!("{path}[{i}]"), &elem, out),
                None => out.push(format!("{path}[{i}]: {key} {} only in {}'s reply", ka[i], self.left)),
            }
        }
        for k in kb.iter().filter(|k| !ka.contains(k)) {
            out.push(format!("{}[]: {key} {k} only in {}'s reply", path, self.right));
        }
        let common_a: Vec<&String> = ka.iter().filter(|k| kb.contains(k)).collect();
        let common_b: Vec<&String> = kb.iter().filter(|k| ka.contains(k)).collect();
        if common_a != common_b {
            let list = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            out.push(format!(
                "{}: order by {key}: {} [{}], {} [{}]",
                show(path),
                self.left,
                list(&common_a),
                self.right,
                list(&common_b)
            ));
        }
    }
}

/// True when the rule for `rule` applies at `generic`: the same path, or one below it.
fn covers(rule: &str, generic: &str) -> bool {
    rule.is_empty()
        || generic == rule
        || (generic.starts_with(rule) && matches!(generic.as_bytes()[rule.len()], b'.' | b'['))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn show(path: &str) -> &str {
    if path.is_empty() {
        "(reply)"
    } else {
        path
    }
}

/// The JSON type, with integers and floats apart (a client may parse either into an integer).
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A value as the differences print it: whole when short, else its start.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= 120 {
        s
    } else {
        format!("{}...", s.chars().take(117).collect::<String>())
    }
}

#[cfg(test)]
mod t {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_difference_is_listed_with_its_path() {
        let a = json!([{"name": "vda1", "disk": [{"pci-controller": {"slot": 5}, "dev": "/dev/vda1"}], "x": 1}]);
        let b = json!([{"name": "vda1", "disk": [{"pci-controller": {"slot": 6}, "serial": "s"}], "x": 1.5}]);
        assert_eq!(
            Compare::default().diff(&a, &b),
            vec![
                "[0].disk[0].dev: vssd \"/dev/vda1\", qemu-ga (missing)",
                "[0].disk[0].pci-controller.slot: vssd 5, qemu-ga 6",
                "[0].disk[0].serial: vssd (missing), qemu-ga \"s\"",
                "[0].x: vssd integer 1, qemu-ga float 1.5",
            ]
        );
    }

    #[test]
    fn numbers_alike_compares_integers_and_floats_by_value() {
        let (a, b) = (json!({"t": 1700000000, "u": 2}), json!({"t": 1700000000.0, "u": 2.5}));
        assert_eq!(Compare::default().numbers_alike().diff(&a, &b), vec!["u: vssd 2, qemu-ga 2.5"]);
        assert_eq!(Compare::default().diff(&a, &b).len(), 2);
    }

    #[test]
    fn rules_relax_the_values_below_their_path() {
        let a = json!({"t": 100, "s": {"rx": 1, "tx": 2}, "n": "a"});
        let b = json!({"t": 103, "s": {"rx": 5, "tx": 9}, "n": "a"});
        let c = Compare::default().check("t", Check::Near(5.0)).check("s", Check::Shape);
        assert!(c.diff(&a, &b).is_empty(), "{:?}", c.diff(&a, &b));
        let c = Compare::default().check("t", Check::Near(1.0));
        assert_eq!(c.diff(&a, &b).len(), 3, "{:?}", c.diff(&a, &b));
        // A rule covers its path and below, not a longer name that starts the same.
        assert!(covers("s", "s.rx") && covers("s", "s[]") && !covers("s", "st"));
    }

    #[test]
    fn keyed_arrays_match_by_key_and_report_order_and_extras_once() {
        let a = json!([{"name": "lo", "v": 1}, {"name": "eth0", "v": 2}, {"name": "x"}]);
        let b = json!([{"name": "eth0", "v": 3}, {"name": "lo", "v": 1}]);
        let d = Compare::default().key("", "name").diff(&a, &b);
        assert_eq!(
            d,
            vec![
                "[1].v: vssd 2, qemu-ga 3",
                "[2]: name \"x\" only in vssd's reply",
                "(reply): order by name: vssd [\"lo\", \"eth0\"], qemu-ga [\"eth0\", \"lo\"]",
            ]
        );
    }

    #[test]
    fn arrays_of_different_length_are_one_difference() {
        let d = Compare::default().diff(&json!({"a": [1, 2]}), &json!({"a": [1]}));
        assert_eq!(d, vec!["a: vssd has 2 elements, qemu-ga has 1"]);
    }
}
