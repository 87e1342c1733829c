//! Classic tracepoints are attached by id, read from tracefs. On some hosts
//! nothing has mounted it yet, so we do, once, where the kernel expects it.

use std::path::Path;

use anyhow::{Context as _, Result};

const MOUNT_POINT: &str = "/sys/kernel/tracing";

pub fn ensure_mounted() -> Result<()> {
    for p in [MOUNT_POINT, "/sys/kernel/debug/tracing"] {
        match std::fs::metadata(Path::new(p).join("events")) {
            Ok(m) if m.is_dir() => return Ok(()),
            // Mounted, but mode 0700 (the default) and we are not root.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                anyhow::bail!("tracefs ({p}) is not readable: grant CAP_DAC_READ_SEARCH (see README, Requirements)")
            }
            _ => {}
        }
    }
    let target = std::ffi::CString::new(MOUNT_POINT).expect("no NUL");
    let fstype = std::ffi::CString::new("tracefs").expect("no NUL");
    let source = std::ffi::CString::new("nodev").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("tracefs is not mounted and mounting it on {MOUNT_POINT} failed"));
    }
    log::info!("mounted tracefs on {MOUNT_POINT}");
    Ok(())
}
