//! A tool whose output goes into a pipe nobody reads any more (`| head`) ends quietly
//! instead of panicking with "failed printing to stdout: Broken pipe".

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

fn run_into_closed_pipe(exe: &str, args: &[&str]) {
    // A pipe whose read end is closed before the tool writes: every write fails.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(exe)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the tool");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{exe}: stderr: {stderr}");
    assert!(!stderr.contains("Broken pipe"), "{exe}: stderr: {stderr}");
    assert_eq!(
        status.signal(),
        Some(libc::SIGPIPE),
        "{exe}: ended by SIGPIPE, as `cat` would; status {status:?}, stderr: {stderr}"
    );
}

#[test]
fn fabric_info_into_a_closed_pipe_is_quiet() {
    run_into_closed_pipe(env!("CARGO_BIN_EXE_fabric-info"), &[]);
}

#[test]
fn fabric_pingpong_help_into_a_closed_pipe_is_quiet() {
    run_into_closed_pipe(env!("CARGO_BIN_EXE_fabric-pingpong"), &["--help"]);
}
