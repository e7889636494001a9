/*
 * voidrun-init: PID 1 of every container sandbox, mounted read-only from the host.
 *
 *   voidrun-init LOG_LIMIT_BYTES -- AGENT [ARG...]
 *
 * - Makes itself non-dumpable, so sandbox commands (same uid, no CAP_SYS_PTRACE) can neither
 *   ptrace it nor open /proc/1/fd, /proc/1/mem or pidfd_getfd its descriptors.
 * - Starts AGENT in its own process group with the listening socket as fd 3, then closes its own
 *   copy of fd 3: only the agent holds the socket.
 * - Gives the agent a pipe as stdout and stderr and copies it into its own fd 1 (the host's
 *   sandbox.log), which it truncates with a one-line marker whenever it would pass
 *   LOG_LIMIT_BYTES: the log never grows beyond that bound.
 * - Reaps every zombie; forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the
 *   agent's process group; exits with the agent's status (128 + signal if it was killed) once the
 *   agent exits, which ends every other process of the sandbox.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define LISTEN_FD 3

static long long log_limit;
static long long log_size;

static void write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += w;
    n -= (size_t)w;
  }
}

/* Appends to fd 1, first truncating it (with a marker line) when this write would pass the bound. */
static void log_write(const char *buf, size_t n) {
  if (log_size + (long long)n > log_limit) {
    char marker[160];
    int m = snprintf(marker, sizeof marker, "voidrun-init: sandbox log reached %lld bytes; earlier output dropped\n", log_limit);
    if (ftruncate(STDOUT_FILENO, 0) == 0) lseek(STDOUT_FILENO, 0, SEEK_SET);
    log_size = 0;
    write_all(STDOUT_FILENO, marker, (size_t)m);
    log_size += m;
    long long room = log_limit - log_size;
    if ((long long)n > room) {
      buf += n - (size_t)room; /* keep the tail of an oversized chunk */
      n = (size_t)room;
    }
  }
  write_all(STDOUT_FILENO, buf, n);
  log_size += (long long)n;
}

/* Copies what the agent has written so far; returns 0 once the pipe is closed. */
static int drain(int fd) {
  char buf[65536];
  for (;;) {
    ssize_t r = read(fd, buf, sizeof buf);
    if (r > 0) {
      log_write(buf, (size_t)r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    return r < 0 && errno == EAGAIN;
  }
}

int main(int argc, char **argv) {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  char *end = NULL;
  if (argc < 4 || strcmp(argv[2], "--") != 0 || (log_limit = strtoll(argv[1], &end, 10)) < 4096 || *end != '\0') {
    dprintf(STDERR_FILENO, "usage: voidrun-init LOG_LIMIT_BYTES(>=4096) -- AGENT [ARG...]\n");
    return 2;
  }
  struct stat st;
  if (fstat(STDOUT_FILENO, &st) == 0 && S_ISREG(st.st_mode)) log_size = st.st_size;

  static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
  sigset_t mask, old;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) sigaddset(&mask, forwarded[i]);
  sigprocmask(SIG_BLOCK, &mask, &old);
  signal(SIGPIPE, SIG_IGN);

  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) {
    dprintf(STDERR_FILENO, "voidrun-init: pipe: %s\n", strerror(errno));
    return 1;
  }
  /* Above fd 3, in case it was not passed (then the pipe would take its number). */
  for (int i = 0; i < 2; i++) {
    int moved = fcntl(out[i], F_DUPFD_CLOEXEC, LISTEN_FD + 1);
    close(out[i]);
    out[i] = moved;
  }
  pid_t agent = fork();
  if (agent < 0) {
    dprintf(STDERR_FILENO, "voidrun-init: fork: %s\n", strerror(errno));
    return 1;
  }
  if (agent == 0) {
    setpgid(0, 0);
    signal(SIGPIPE, SIG_DFL);
    sigprocmask(SIG_SETMASK, &old, NULL);
    dup2(out[1], STDOUT_FILENO);
    dup2(out[1], STDERR_FILENO);
    int flags = fcntl(LISTEN_FD, F_GETFD);
    if (flags >= 0) fcntl(LISTEN_FD, F_SETFD, flags & ~FD_CLOEXEC);
    execv(argv[3], argv + 3);
    dprintf(STDERR_FILENO, "voidrun-init: cannot run %s: %s\n", argv[3], strerror(errno));
    _exit(127);
  }
  setpgid(agent, agent);
  close(LISTEN_FD);
  close(out[1]);
  fcntl(out[0], F_SETFL, O_NONBLOCK);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
  if (sfd < 0) {
    dprintf(STDERR_FILENO, "voidrun-init: signalfd: %s\n", strerror(errno));
    kill(agent, SIGKILL);
    return 1;
  }

  int pipe_open = 1;
  for (;;) {
    struct pollfd fds[2] = {{.fd = sfd, .events = POLLIN}, {.fd = pipe_open ? out[0] : -1, .events = POLLIN}};
    if (poll(fds, 2, -1) < 0 && errno != EINTR) return 1;
    if (fds[1].revents) {
      pipe_open = drain(out[0]);
      if (!pipe_open) close(out[0]);
    }
    if (!(fds[0].revents & POLLIN)) continue;
    struct signalfd_siginfo si;
    if (read(sfd, &si, sizeof si) != sizeof si) continue;
    if ((int)si.ssi_signo != SIGCHLD) {
      if (kill(-agent, (int)si.ssi_signo) != 0) kill(agent, (int)si.ssi_signo);
      continue;
    }
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      if (pid != agent) continue;
      if (pipe_open) drain(out[0]);
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
  }
}
