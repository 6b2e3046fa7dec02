"""The seccomp profile of sandbox containers: an explicit allowlist, so that what the kernel offers
a sandbox does not depend on the Docker version's built-in default.

``profile()`` allows every syscall of the x86_64 table (Linux 6.1; the aarch64 table's names are a
subset of it) except ``DENIED``, and restricts three by argument: ``clone`` without namespace flags,
``socket`` without ``AF_VSOCK``, ``personality`` to queries. A syscall it does not name is refused
with EPERM; ``clone3`` with ENOSYS, so that the C library falls back to ``clone``, whose flags a
filter can see. Syscalls newer than the engine's libseccomp return ENOSYS (runc's own stub).
Only the native architecture is listed: 32-bit (ia32, x32) syscalls are refused as a whole.
"""

from __future__ import annotations

import json

# Linux syscall names (x86_64 table of Linux 6.1).
SYSCALLS = """
_sysctl accept accept4 access acct add_key adjtimex afs_syscall alarm arch_prctl bind bpf brk capget
capset chdir chmod chown chroot clock_adjtime clock_getres clock_gettime clock_nanosleep clock_settime
clone clone3 close close_range connect copy_file_range creat create_module delete_module dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old
eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate fanotify_init
fanotify_mark fchdir fchmod fchmodat fchown fchownat fcntl fdatasync fgetxattr finit_module flistxattr
flock fork fremovexattr fsconfig fsetxattr fsmount fsopen fspick fstat fstatfs fsync ftruncate futex
futex_waitv futimesat get_kernel_syms get_mempolicy get_robust_list get_thread_area getcpu getcwd
getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid
getpmsg getppid getpriority getrandom getresgid getresuid getrlimit getrusage getsid getsockname
getsockopt gettid gettimeofday getuid getxattr init_module inotify_add_watch inotify_init inotify_init1
inotify_rm_watch io_cancel io_destroy io_getevents io_pgetevents io_setup io_submit io_uring_enter
io_uring_register io_uring_setup ioctl ioperm iopl ioprio_get ioprio_set kcmp kexec_file_load kexec_load
keyctl kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr link
linkat listen listxattr llistxattr lookup_dcookie lremovexattr lseek lsetxattr lstat madvise mbind
membarrier memfd_create memfd_secret migrate_pages mincore mkdir mkdirat mknod mknodat mlock mlock2
mlockall mmap modify_ldt mount mount_setattr move_mount move_pages mprotect mq_getsetattr mq_notify
mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock
munlockall munmap name_to_handle_at nanosleep newfstatat nfsservctl open open_by_handle_at open_tree
openat openat2 pause perf_event_open personality pidfd_getfd pidfd_open pidfd_send_signal pipe pipe2
pivot_root pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64 preadv preadv2 prlimit64
process_madvise process_mrelease process_vm_readv process_vm_writev pselect6 ptrace putpmsg pwrite64
pwritev pwritev2 query_module quotactl quotactl_fd read readahead readlink readlinkat readv reboot
recvfrom recvmmsg recvmsg remap_file_pages removexattr rename renameat renameat2 request_key
restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn
rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min
sched_getaffinity sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval
sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp security select
semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto set_mempolicy set_mempolicy_home_node
set_robust_list set_thread_area set_tid_address setdomainname setfsgid setfsuid setgid setgroups
sethostname setitimer setns setpgid setpriority setregid setresgid setresuid setreuid setrlimit setsid
setsockopt settimeofday setuid setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd
signalfd4 socket socketpair splice stat statfs statx swapoff swapon symlink symlinkat sync
sync_file_range syncfs sysfs sysinfo syslog tee tgkill time timer_create timer_delete timer_getoverrun
timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill truncate tuxcall
umask umount2 uname unlink unlinkat unshare uselib userfaultfd ustat utime utimensat utimes vfork
vhangup vmsplice vserver wait4 waitid write writev
""".split()

_MOUNT = "mount umount2 pivot_root chroot mount_setattr move_mount open_tree fsopen fsconfig fsmount fspick"
_ADMIN = (
    "kexec_load kexec_file_load init_module finit_module delete_module create_module reboot swapon swapoff"
    " acct syslog quotactl quotactl_fd iopl ioperm vhangup settimeofday clock_settime clock_adjtime"
    " adjtimex sethostname setdomainname migrate_pages move_pages fanotify_init"
)
_OBSOLETE = (
    "lookup_dcookie nfsservctl uselib get_kernel_syms query_module _sysctl sysfs ustat afs_syscall tuxcall"
    " security vserver putpmsg getpmsg epoll_ctl_old epoll_wait_old modify_ldt"
)
# name -> why it is refused (EPERM)
DENIED: dict[str, str] = {
    **dict.fromkeys(
        ["io_uring_setup", "io_uring_enter", "io_uring_register"],
        "io_uring: a large, often exploited surface",
    ),
    **dict.fromkeys(["keyctl", "add_key", "request_key"], "kernel keyrings are not namespaced"),
    "bpf": "eBPF programs run in the kernel",
    "userfaultfd": "stalls kernel code paths at will (a classic race-widening tool)",
    "perf_event_open": "performance counters leak other processes' and the kernel's behaviour",
    **dict.fromkeys(_MOUNT.split(), "mounting and changing roots"),
    **dict.fromkeys(["unshare", "setns"], "new namespaces (user namespaces expose privileged kernel code)"),
    **dict.fromkeys(["open_by_handle_at", "name_to_handle_at"], "file handles reach past the mount tree"),
    **dict.fromkeys(_ADMIN.split(), "host administration"),
    **dict.fromkeys(_OBSOLETE.split(), "obsolete or unused; no reason to expose"),
    # restricted by argument below; refused otherwise
    "clone": "only without namespace flags",
    "clone3": "ENOSYS: its flags are out of a filter's sight; the C library falls back to clone",
    "socket": "only without AF_VSOCK (a path out of the machine that network mode none does not close)",
    "personality": "only PER_LINUX and the query",
}
CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
AF_VSOCK = 40
EPERM, ENOSYS = 1, 38
ARCHES = {"amd64": "SCMP_ARCH_X86_64", "x86_64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64"}


def _arg(index: int, value: int, op: str, value_two: int = 0) -> dict[str, object]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def profile(arch: str = "amd64") -> str:
    """The profile as the JSON text Docker takes in ``SecurityOpt: ["seccomp=<json>"]``."""
    allowed = [n for n in SYSCALLS if n not in DENIED]
    rules: list[dict[str, object]] = [
        {"names": allowed, "action": "SCMP_ACT_ALLOW"},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [_arg(0, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ")],
        },
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, AF_VSOCK, "SCMP_CMP_NE")]},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, 0, "SCMP_CMP_EQ")]},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, 0xFFFFFFFF, "SCMP_CMP_EQ")]},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    arch_name = ARCHES.get(arch)
    return json.dumps(
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": EPERM,
            "architectures": [arch_name] if arch_name else [],
            "syscalls": rules,
        },
        separators=(",", ":"),
    )
