//! Which container a process is in, from its cgroup v2 path (the `0::`
//! line of `/proc/PID/cgroup`), as the container runtimes name their
//! cgroups:
//!
//! * docker: `.../docker-<id>.scope` (systemd driver), `/docker/<id>`
//!   (cgroupfs driver);
//! * containerd (CRI): `.../cri-containerd-<id>.scope`;
//! * cri-o: `.../crio-<id>.scope`;
//! * podman: `.../libpod-<id>.scope`;
//! * Kubernetes with the cgroupfs driver: `/kubepods/.../pod<uid>/<id>`.
//!
//! `<id>` is 64 lowercase hex digits: the bare form that the OpenTelemetry
//! collector's `k8sattributes` matches. The innermost match wins (a
//! container in a container is named by its own id); a runtime's helper
//! cgroups (`crio-conmon-<id>.scope`, `libpod-conmon-<id>.scope`) are not
//! containers.

/// The process's cgroup v2 path: the `0::` line of `/proc/PID/cgroup`.
pub fn cgroup_v2_path(proc_pid_cgroup: &str) -> Option<&str> {
    proc_pid_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The container id a cgroup path names, if it is a container runtime's.
pub fn id_from_cgroup(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    (0..parts.len()).rev().find_map(|i| {
        let part = parts[i];
        if let Some(unit) = part.strip_suffix(".scope") {
            return ["docker-", "cri-containerd-", "crio-", "libpod-"]
                .iter()
                .find_map(|prefix| unit.strip_prefix(prefix))
                .filter(|id| is_id(id))
                .map(str::to_string);
        }
        let parent = i.checked_sub(1).map(|j| parts[j]);
        let under_runtime = parent == Some("docker")
            || parent.is_some_and(|p| p.starts_with("pod")) && parts[..i].iter().any(|p| p.starts_with("kubepods"));
        (under_runtime && is_id(part)).then(|| part.to_string())
    })
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A container id as `docker ps` shows it: its first 12 digits.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a1b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7a8";
    const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn id(path: &str) -> Option<String> {
        id_from_cgroup(path)
    }

    #[test]
    fn runtimes_cgroups_name_their_containers() {
        let want = Some(ID.to_string());
        // docker, systemd and cgroupfs drivers.
        assert_eq!(id(&format!("/system.slice/docker-{ID}.scope")), want);
        assert_eq!(id(&format!("/docker/{ID}")), want);
        // containerd under Kubernetes (systemd driver).
        assert_eq!(
            id(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7c1e7e2a_54d2_4b9e_9f0e_0d6b7c2a9e11.slice/cri-containerd-{ID}.scope"
            )),
            want
        );
        // cri-o.
        assert_eq!(
            id(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d6b7c2a_9e11_4b9e_9f0e_7c1e7e2a54d2.slice/crio-{ID}.scope"
            )),
            want
        );
        // podman, rootful and rootless.
        assert_eq!(id(&format!("/machine.slice/libpod-{ID}.scope")), want);
        assert_eq!(
            id(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
            )),
            want
        );
        // Kubernetes, cgroupfs driver.
        assert_eq!(
            id(&format!(
                "/kubepods/burstable/pod7c1e7e2a-54d2-4b9e-9f0e-0d6b7c2a9e11/{ID}"
            )),
            want
        );
    }

    #[test]
    fn the_innermost_container_wins() {
        // podman with systemd inside: the payload is one level below.
        assert_eq!(
            id(&format!("/machine.slice/libpod-{ID}.scope/container")),
            Some(ID.to_string())
        );
        // docker in docker.
        assert_eq!(id(&format!("/docker/{ID}/docker/{ID2}")), Some(ID2.to_string()));
        assert_eq!(
            id(&format!(
                "/system.slice/docker-{ID}.scope/system.slice/docker-{ID2}.scope"
            )),
            Some(ID2.to_string())
        );
    }

    #[test]
    fn other_cgroups_are_not_containers() {
        for path in [
            "/",
            "",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            // The runtimes' monitors, beside their containers.
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            &format!("/kubepods.slice/crio-conmon-{ID}.scope"),
            // Not 64 lowercase hex digits.
            &format!("/system.slice/docker-{}.scope", &ID[..63]),
            &format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
            &format!("/system.slice/docker-{ID}0.scope"),
            // A bare id outside a runtime's tree.
            &format!("/system.slice/{ID}"),
            &format!("/kubepods/burstable/{ID}"),
        ] {
            assert_eq!(id(path), None, "{path}");
        }
    }

    #[test]
    fn reads_the_v2_line_of_proc_pid_cgroup() {
        let hybrid = format!(
            "12:memory:/system.slice/docker-{ID}.scope\n1:name=systemd:/system.slice/docker-{ID}.scope\n0::/system.slice/docker-{ID}.scope\n"
        );
        assert_eq!(
            cgroup_v2_path(&hybrid).map(str::to_string),
            Some(format!("/system.slice/docker-{ID}.scope"))
        );
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(cgroup_v2_path("4:memory:/x\n"), None);
    }

    #[test]
    fn short_ids_as_docker_ps_shows_them() {
        assert_eq!(short_id(ID), "3f2a1b4c5d6e");
        assert_eq!(short_id("abc"), "abc");
    }
}
