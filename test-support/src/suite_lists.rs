//! A rule that is not in its suite macro's list never runs, and nothing would say so: this
//! test reads the rule modules' sources and fails on any rule the lists in `lib.rs` miss.
//!
//! A rule is a top-level `pub fn` that takes the suite's setup (`&dyn …Setup`); the other
//! `pub fn`s of a rule module are helpers.

/// Each suite macro, the module it instantiates and that module's source.
const SUITES: &[(&str, &str, &str)] = &[
    ("transport_suite", "transport", include_str!("transport.rs")),
    ("reports_suite", "reports", include_str!("reports.rs")),
    ("app_suite", "app", include_str!("app.rs")),
    ("lifecycle_suite", "lifecycle", include_str!("lifecycle.rs")),
];

/// The names of the rules in a module's source.
fn rules_in(source: &str) -> Vec<String> {
    let mut rules: Vec<String> = source
        .split("\npub fn ")
        .skip(1)
        .filter_map(|rest| {
            let (name, rest) = rest.split_once('(')?;
            let (params, _) = rest.split_once(')')?;
            params.contains("Setup").then(|| name.trim().to_owned())
        })
        .collect();
    rules.sort();
    rules
}

/// The rule names listed in `macro_rules! $suite`'s `__suite!(setup, module, rules…)`, after
/// checking that it instantiates `module`.
fn listed_in(lib: &str, suite: &str, module: &str) -> Vec<String> {
    let start = lib.find(&format!("macro_rules! {suite} {{")).unwrap_or_else(|| panic!("no macro `{suite}`"));
    let body = &lib[start..];
    let open = body.find("__suite!(").unwrap_or_else(|| panic!("`{suite}` does not call `__suite!`"));
    let args = &body[open + "__suite!(".len()..];
    let args = &args[..args.find(')').unwrap_or_else(|| panic!("`{suite}`: unclosed `__suite!(`"))];
    let mut args = args.split(',').map(str::trim).filter(|arg| !arg.is_empty());
    assert_eq!(args.next(), Some("$setup"), "`{suite}`: the first argument is the setup");
    assert_eq!(args.next(), Some(format!("$crate::{module}").as_str()), "`{suite}` instantiates another module");
    // `waiter = NAME` (the app suite's rules also take a waiter) is not a rule.
    let mut listed: Vec<String> = args.filter(|arg| !arg.starts_with("waiter =")).map(str::to_owned).collect();
    listed.sort();
    listed
}

#[test]
fn every_rule_is_listed_in_its_suite() {
    let lib = include_str!("lib.rs");
    for (suite, module, source) in SUITES {
        let rules = rules_in(source);
        assert!(!rules.is_empty(), "no rules found in {module}.rs: has the form of a rule changed?");
        let listed = listed_in(lib, suite, module);
        let unlisted: Vec<&String> = rules.iter().filter(|rule| !listed.contains(rule)).collect();
        assert!(
            unlisted.is_empty(),
            "{module}.rs has rules that `{suite}!` does not list, so they never run: {unlisted:?} \
             (add them to the list in lib.rs)"
        );
        assert_eq!(rules, listed, "`{suite}!` lists names that are not rules of {module}.rs");
    }
}

#[test]
fn the_reader_finds_rules_and_lists() {
    let source = "use x;\npub fn helper(a: u8) {}\npub fn rule_a(setup: &dyn AppSetup) {\n}\n\
                  pub fn rule_b(\n    setup: &dyn AppSetup,\n) {}\nfn private(setup: &dyn AppSetup) {}\n";
    assert_eq!(rules_in(source), ["rule_a", "rule_b"]);
    let lib = "macro_rules! app_suite {\n    ($setup:expr) => {\n        $crate::__suite!(\n            $setup,\n            \
               $crate::app,\n            rule_b,\n            rule_a,\n        );\n    };\n}\n";
    assert_eq!(listed_in(lib, "app_suite", "app"), ["rule_a", "rule_b"]);
    let source = "use x;\npub fn rule_c(setup: &dyn AppSetup, waiter: &Waiter) {}\n";
    assert_eq!(rules_in(source), ["rule_c"]);
    let lib = "macro_rules! app_suite {\n    ($setup:expr) => {\n        $crate::app_suite!($setup, waiters = [a, b]);\n    \
               };\n    ($setup:expr, waiters = [$($waiter:ident),+]) => {\n        $crate::__suite!(\n            \
               $setup,\n            $crate::app,\n            waiter = $waiter,\n            rule_c,\n        );\n    };\n}\n";
    assert_eq!(listed_in(lib, "app_suite", "app"), ["rule_c"]);
}
