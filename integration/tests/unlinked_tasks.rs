//! The linking pitfall, reproduced: `dingo-test-support` defines `#[dingo::task]`s and is a
//! dependency of this test, but nothing here refers to it, so Rust leaves it out of the
//! binary and its tasks are not registered. Every error a user then meets says so, and
//! what to write instead (`use dingo_test_support as _;`).

use dingo::{App, Error, TaskErrorKind};

/// The conformance suite's `plus_one`, defined in `dingo-test-support`.
const PLUS_ONE: &str = "conformance.plus_one";

#[test]
fn tasks_of_a_crate_nothing_refers_to_are_not_linked() {
    let names: Vec<&str> = dingo::registry::linked_tasks().map(|decl| decl.name).collect();
    assert_eq!(names, Vec::<&str>::new());
}

#[test]
fn allocating_all_of_no_task_says_why_there_may_be_none() {
    let app = App::local().unwrap();
    let err = app.allocate_all(2).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid configuration: no task is registered in this app: register closures with `App::register` or \
         define `#[dingo::task]` functions; tasks in a crate nothing in the binary refers to are not linked, so \
         not registered (add `use my_tasks as _;` to the binary)"
    );
    app.close().unwrap();
}

#[test]
fn allocating_or_calling_an_unlinked_task_names_the_likely_cause() {
    let app = App::local().unwrap();
    let hint = "if it is a `#[dingo::task]`, the crate defining it may not be linked into this binary (a crate \
                nothing refers to is left out, and its tasks with it): add `use that_crate as _;` to the binary";

    let err = app.allocate(PLUS_ONE, 1).unwrap_err();
    assert!(matches!(&err, Error::UnknownTask { name } if name == PLUS_ONE), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("no task named `{PLUS_ONE}` is registered in this app: register a closure first; {hint}")
    );

    let err = app.call::<_, i64>(PLUS_ONE, 1i64).unwrap_err();
    assert_eq!(err.task_kind(), Some(TaskErrorKind::UnknownTask), "{err:?}");
    assert_eq!(
        err.task_error().unwrap().message(),
        format!("no queue serves task `{PLUS_ONE}`: no app on this broker has registered it; {hint}")
    );
    app.close().unwrap();
}
