"""The in-container half of a session: a Perl driver (``perl-base`` is in every Debian image) that
keeps one bash alive and runs each command in a forked subshell of it, so a command costs a fork
(under a millisecond) instead of a ``docker exec`` (~40-90 ms) or a fresh bash (~3 ms).

Two uids. The driver runs as root (its only capabilities: setuid, setgid, setpcap, kill); the bash
it keeps (the *executor*) and every command run as the agent uid, with an empty capability
bounding set. So no command can signal, trace, or open the file descriptors of the driver: the
channel to sandboxd is out of the agent's reach.

Driver protocol, on the ``docker exec`` stdin/stdout of ``perl -e BOOT DIR EXECUTOR UID GID STATE
HOME USER``:

- sandboxd -> driver: first ``S <key> <len init>\\n<init>`` (a per-session MAC key, 64 hex, and the
  shell lines that set the session's initial cwd and env); then ``R <token> <timeout_ms> <cap>
  <keep> <len pre> <len cmd>\\n<pre><cmd>`` runs a command (``pre`` sets cwd and env; ``keep=1``
  carries cwd and exports over to the next command); ``I <token>\\n`` interrupts it (SIGINT to its
  process group), ``K <token>\\n`` kills every agent process; ``Z <nonce>\\n`` (idle) kills every agent
  process and reports how many there were.
- driver -> sandboxd: frames ``<kind> <seq> <len> <mac>\\n<data>``, where ``seq`` counts frames from 0
  and ``mac`` is the first 32 hex digits of HMAC-SHA256(key, ``<kind> <seq> <len>\\n<data>``):
  ``h`` (hello: the driver's pid), ``o``/``e`` head bytes of stdout/stderr as they come, ``O``/``E``
  their kept tail at the end, then ``x`` with ``<token> <status> <timed_out> <stdout total> <stderr
  total> <oom kills or -1> <started> <shell died>`` (started: 1 ran, 0 could not fork, -1 could not
  even write the command's files: nothing was tried); ``z`` answers ``Z`` with ``<nonce> <killed>
  <left>``.

Each command is a bash job (``set -m``: its own process group) whose stdout and stderr are FIFOs made
for it alone, so output ends when every process holding them is gone (as with ``docker exec``) and
nothing a stray background process prints can leak into a later command. The session directory and
the command files are root's (the agent can read them, not change them). On timeout (or ``K``) the
driver kills every process of the agent uid, found in /proc by uid (``setsid``, double forks, a
cleared environment: no escape keeps the uid); the executor is restarted before the next command,
from the cwd and exports it last saved. The driver keeps at most ``cap/2`` bytes of tail per
stream: memory is bounded whatever a command prints.
"""

# ruff: noqa: E501  (Perl source: its long lines read better whole)
from __future__ import annotations

EXECUTOR = r"""
set -m
__rs_d=$1 __rs_s=$2
shift 2
if [ -n "$__rs_s" ] && [ -s "$__rs_s" ]; then . "$__rs_s"; else . "$__rs_d/init"; fi
__rs_save() {
  [ -n "$__rs_s" ] && { printf 'cd -- %q\n' "$PWD"; export -p; } >"$__rs_s" 2>/dev/null
}
while read -r __rs_t __rs_k; do
  (
    printf 'P %s %s\n' "$__rs_t" "$BASHPID" >&3
    exec 3>&-
    if [ "$__rs_k" = 1 ]; then trap __rs_save EXIT; fi
    . "$__rs_d/p" || exit 126
    . "$__rs_d/c"
  ) </dev/null >"$__rs_d/o.$__rs_t" 2>"$__rs_d/e.$__rs_t" &
  wait "$!"
  __rs_x=$?
  if [ "$__rs_k" = 1 ] && [ -s "$__rs_s" ]; then . "$__rs_s"; fi
  printf 'X %s %s\n' "$__rs_t" "$__rs_x" >&3
done
"""

DRIVER = r"""
use strict; no warnings; use POSIX (); use Fcntl qw(O_RDONLY O_NONBLOCK); use Time::HiRes qw(time); use Digest::SHA qw(hmac_sha256_hex);
my ($dir, $EXECUTOR, $UID, $GID, $state, $HOME, $USER) = @ARGV;
$SIG{PIPE} = 'IGNORE';
binmode STDIN; binmode STDOUT;
my ($in, $st, $key, $seq, $bash, $cw, $sr) = ('', '', '', 0, 0, undef, undef);
sub out { my $d = shift; my $o = 0; while ($o < length $d) { my $n = syswrite(STDOUT, $d, length($d) - $o, $o); exit 0 unless defined $n; $o += $n } }
sub frame { my $h = "$_[0] $seq " . length($_[1]); $seq++; out("$h " . substr(hmac_sha256_hex("$h\n$_[1]", $key), 0, 32) . "\n$_[1]") }
sub fill { my $n = sysread(STDIN, my $c, 65536); return 0 unless $n; $in .= $c; 1 }
sub line { my $i; until (($i = index($in, "\n")) >= 0) { fill() or return undef } my $l = substr($in, 0, $i + 1, ''); chop $l; $l }
sub bytes { my $n = shift; while (length($in) < $n) { fill() or return undef } substr($in, 0, $n, '') }
sub spit { my ($p, $d) = @_; open(my $f, '>', $p) or return 0; binmode $f; print $f $d or return 0; close $f }
sub agents {  # live processes of the agent uid: pid => process group
  my %a; opendir(my $dh, '/proc') or return %a;
  for my $p (grep { /^\d+$/ } readdir $dh) {
    open(my $f, '<', "/proc/$p/status") or next; my ($s, $mine) = ('', 0);
    while (<$f>) { $s = $1 if /^State:\s+(\S)/; if (/^Uid:\s+(\d+)\s+(\d+)\s+(\d+)/) { $mine = ($1 == $UID || $2 == $UID || $3 == $UID); last } }
    close $f;
    next unless $mine && $s ne 'Z' && $s ne 'X';
    open($f, '<', "/proc/$p/stat") or next; my $t = <$f>; close $f;
    $a{$p} = $t =~ /\)\s+\S+\s+\d+\s+(\d+)/ ? $1 : 0;
  }
  %a
}
sub reap { while ((my $p = waitpid(-1, POSIX::WNOHANG())) > 0) { $bash = 0 if $p == $bash } }
sub sweep {  # SIGKILL every agent process until none is left; returns (found, left)
  my %seen; my $until = time + 3;
  while (time < $until) {
    my %a = agents(); last unless %a;
    my @new = grep { !$seen{$_} } keys %a; $seen{$_} = 1 for @new;
    kill 'KILL', keys %a;
    select(undef, undef, undef, @new ? 0 : 0.002);
  }
  reap(); my %left = agents();
  (scalar(keys %seen), scalar(keys %left))
}
sub signal_group { my ($sig, $pg) = @_; return unless $pg; my %a = agents(); kill $sig, grep { $a{$_} == $pg } keys %a }
sub executor {  # (re)start the agent's shell unless it runs; false if it cannot be started
  reap(); return 1 if $bash;
  close $cw if $cw; close $sr if $sr; $st = '';
  pipe(my $cr, my $w) or return 0; pipe(my $r, my $sw) or return 0;
  my $pid = fork; return 0 unless defined $pid;
  if (!$pid) {
    $SIG{PIPE} = 'DEFAULT';
    open(STDIN, '<&', $cr); POSIX::dup2(fileno($sw), 3);
    open(STDOUT, '>', '/dev/null'); open(STDERR, '>', '/dev/null');
    my $prctl = {x86_64 => 157, aarch64 => 167}->{(POSIX::uname())[4]};
    if ($prctl) { syscall($prctl, 24, $_) for 0 .. 63 }  # PR_CAPBSET_DROP: no capability left to regain
    POSIX::setgid($GID); $) = "$GID $GID"; POSIX::setuid($UID);
    POSIX::_exit(126) unless $< == $UID && $> == $UID && POSIX::getgid() == $GID && POSIX::getegid() == $GID && join(',', POSIX::getgroups()) eq "$GID";
    %ENV = (PATH => $ENV{PATH} || '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME => $HOME, LANG => 'C.UTF-8', USER => $USER, LOGNAME => $USER, SHELL => '/bin/bash');
    chdir $HOME;
    exec 'bash', '--noprofile', '--norc', '-c', $EXECUTOR, 'bash', $dir, $state; POSIX::_exit(127);
  }
  close $cr; close $sw; ($bash, $cw, $sr) = ($pid, $w, $r); select((select($cw), $| = 1)[0]); 1
}
sub oomcount {
  for my $p ('/sys/fs/cgroup/memory/memory.oom_control', '/sys/fs/cgroup/memory.events') {
    open(my $f, '<', $p) or next; while (<$f>) { return $1 if /^oom_kill (\d+)/ }
  }
  -1
}
sub run1 {
  my ($tok, $tmo, $cap, $keep, $pre, $cmd) = @_;
  my $t0 = time; my ($o, $e) = ("$dir/o.$tok", "$dir/e.$tok");
  unlink $o, $e;
  unless (executor()) {
    my $why = "sandboxd session: cannot start the shell (process limit reached?)\n";
    frame('e', $why); frame('x', "$tok 126 0 0 " . length($why) . " -1 0 0"); return;
  }
  my ($ofh, $efh);
  unless (spit("$dir/p", $pre) && spit("$dir/c", $cmd) && POSIX::mkfifo($o, 0600) && POSIX::mkfifo($e, 0600) && chmod(0622, $o, $e) == 2
      && sysopen($ofh, $o, O_RDONLY | O_NONBLOCK) && sysopen($efh, $e, O_RDONLY | O_NONBLOCK)) {
    my $why = "sandboxd session: cannot prepare the command in $dir: $!\n"; unlink $o, $e;
    frame('e', $why); frame('x', "$tok 126 0 0 " . length($why) . " -1 -1 0"); return;
  }
  my $hc = int($cap / 2); my $tc = $cap - $hc;
  my @s = ({fh => $ofh, k => 'o', sent => 0, tail => '', tot => 0, open => 1},
           {fh => $efh, k => 'e', sent => 0, tail => '', tot => 0, open => 1});
  my ($pid, $status, $timed, $hard, $intr, $swept, $shell, $sro) = (0, undef, 0, undef, 0, 0, 0, 1);
  unless (print $cw "$tok $keep\n") { reap(); $status = 137; $shell = 1 }
  while (1) {
    my $now = time;
    if (!$timed && $now >= $t0 + $tmo) { $timed = 1; $swept = 1; sweep(); $hard = $now + 2 }
    if (defined $hard && $now >= $hard) { $_->{open} = 0 for @s; if ($now >= $hard + 3) { $status //= 137; last } }
    reap();
    if (!$bash && !defined $status) { $status = 137; unless ($swept) { $shell = 1; $pid = 0 } }  # killed by us: drain
    my @live = grep { $_->{open} } @s;
    last if defined $status && (!$pid || !@live);
    my $rin = ''; vec($rin, fileno(STDIN), 1) = 1; vec($rin, fileno($sr), 1) = 1 if $sro && $sr;
    vec($rin, fileno($_->{fh}), 1) = 1 for @live;
    my $wait = !defined $hard ? $t0 + $tmo - $now : $now < $hard ? $hard - $now : $hard + 3 - $now;
    $wait = 0 if $wait < 0; $wait = 0.25 if $wait > 0.25;  # also polls for the shell's death
    my $n = select(my $rout = $rin, undef, undef, $wait);
    next if $n <= 0;
    if ($sro && $sr && vec($rout, fileno($sr), 1)) {
      my $r = sysread($sr, my $c, 4096);
      if (!$r) { $sro = 0; next }
      $st .= $c;
      while ($st =~ s/^([^\n]*)\n//) {
        my $l = $1; next unless $l =~ /^([PX]) (\w+) (\d+)$/ && $2 eq $tok;
        if ($1 eq 'P') { $pid = $3; signal_group('INT', $pid) if $intr } else { $status = $3 }
      }
      $st = '' if length $st > 256;
    }
    if (vec($rout, fileno(STDIN), 1)) {
      unless (fill()) { signal_group('KILL', $pid); exit 0 }
      while ($in =~ /^([IK]) (\w+)\n/) {
        my ($what, $who) = ($1, $2); $in =~ s/^[^\n]*\n//;
        next unless $who eq $tok;
        if ($what eq 'I') { $intr = 1; signal_group('INT', $pid) } else { $swept = 1; sweep() }
      }
    }
    for my $x (@live) {
      next unless vec($rout, fileno($x->{fh}), 1);
      my $r = sysread($x->{fh}, my $buf, 65536);
      next unless defined $r;
      if ($r == 0) { $x->{open} = 0; next }
      $x->{tot} += $r;
      if ($x->{sent} < $hc) {
        my $take = $hc - $x->{sent}; $take = $r if $take > $r;
        frame($x->{k}, substr($buf, 0, $take)); $x->{sent} += $take; substr($buf, 0, $take, '');
      }
      if (length $buf && $tc) {
        $x->{tail} .= $buf; my $over = length($x->{tail}) - $tc;
        substr($x->{tail}, 0, $over, '') if $over > 0;
      }
    }
  }
  close $_->{fh} for @s; unlink $o, $e;
  for my $x (@s) { frame(uc $x->{k}, $x->{tail}) if length $x->{tail} }
  my $oom = ($status == 137 && !$timed) ? oomcount() : -1;
  frame('x', join(' ', $tok, $status, $timed, $s[0]{tot}, $s[1]{tot}, $oom, $pid ? 1 : 0, $shell ? 1 : 0));
}
my $hello = line();
exit 1 unless defined $hello && $hello =~ /^S ([0-9a-f]{64}) (\d+)$/;
$key = $1; my $init = bytes($2);
exit 1 unless defined $init && spit("$dir/init", $init);
executor();
frame('h', "$$");
while (defined(my $l = line())) {
  if ($l =~ /^R (\w+) (\d+) (\d+) ([01]) (\d+) (\d+)$/) {
    my ($tok, $ms, $cap, $keep) = ($1, $2, $3, $4);
    my $pre = bytes($5); my $cmd = bytes($6);
    last unless defined $cmd;
    run1($tok, $ms / 1000, $cap, $keep, $pre, $cmd);
  } elsif ($l =~ /^Z (\w+)$/) {
    my $nonce = $1; reap(); my $own = $bash ? 1 : 0;
    my ($n, $left) = sweep();
    frame('z', join(' ', $nonce, $n > $own ? $n - $own : 0, $left));
  }
}
close $cw if $cw;
"""
