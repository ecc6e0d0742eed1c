/*
 * A power failure for one directory, for crash tests: loaded into pgward with LD_PRELOAD, it
 * keeps every pwrite to a regular file under $LOSE_UNSYNCED_DIR in this process's memory until
 * an fsync or fdatasync of that file, and only then writes it (in order) and syncs. A SIGKILL
 * therefore loses exactly what was never synced, as a power failure loses what the disk
 * never made durable; written-but-unsynced data otherwise survives a process crash in the
 * page cache.
 *
 * Built by the test with `cc -shared -fPIC`. Not thread-fast, not general: enough for the
 * audit writer, which appends with pwrite64 (page cache or O_DIRECT) and syncs with fdatasync.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* Buffers are aligned for O_DIRECT descriptors. */
#define ALIGN 4096

struct pending {
    dev_t dev;
    ino_t ino;
    int fd; /* a dup of the writer's descriptor (same open file, same flags) */
    off_t off;
    size_t len;
    void *data;
    struct pending *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct pending *head, *tail;

typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef int (*sync_fn)(int);

static pwrite_fn real_pwrite64(void) {
    static pwrite_fn f;
    if (!f) f = (pwrite_fn)dlsym(RTLD_NEXT, "pwrite64");
    return f;
}

/* Whether fd is a regular file under the directory; its identity in *st. */
static int watched(int fd, struct stat *st) {
    const char *dir = getenv("LOSE_UNSYNCED_DIR");
    if (!dir || !*dir) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    size_t dl = strlen(dir);
    if (strncmp(path, dir, dl) != 0 || (path[dl] != '/' && path[dl] != 0)) return 0;
    return fstat(fd, st) == 0 && S_ISREG(st->st_mode);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off) {
    struct stat st;
    if (len == 0 || !watched(fd, &st)) return real_pwrite64()(fd, buf, len, off);
    struct pending *p = calloc(1, sizeof *p);
    if (!p || posix_memalign(&p->data, ALIGN, len) != 0) {
        free(p);
        errno = ENOMEM;
        return -1;
    }
    memcpy(p->data, buf, len);
    p->dev = st.st_dev;
    p->ino = st.st_ino;
    p->fd = dup(fd);
    p->off = off;
    p->len = len;
    pthread_mutex_lock(&mu);
    if (tail) tail->next = p; else head = p;
    tail = p;
    pthread_mutex_unlock(&mu);
    return (ssize_t)len;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) {
    return pwrite64(fd, buf, len, off);
}

/* Write out, in order, what is pending for fd's file. */
static int flush_file(int fd) {
    struct stat st;
    if (!watched(fd, &st)) return 0;
    int rc = 0;
    pthread_mutex_lock(&mu);
    struct pending **pp = &head, *prev = NULL;
    while (*pp) {
        struct pending *p = *pp;
        if (p->dev == st.st_dev && p->ino == st.st_ino) {
            size_t done = 0;
            while (done < p->len) {
                ssize_t w = real_pwrite64()(p->fd, (char *)p->data + done, p->len - done, p->off + (off_t)done);
                if (w <= 0) { rc = -1; break; }
                done += (size_t)w;
            }
            close(p->fd);
            free(p->data);
            *pp = p->next;
            if (tail == p) tail = prev;
            free(p);
            if (rc) break;
        } else {
            prev = p;
            pp = &p->next;
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

int fdatasync(int fd) {
    static sync_fn real;
    if (!real) real = (sync_fn)dlsym(RTLD_NEXT, "fdatasync");
    if (flush_file(fd)) return -1;
    return real(fd);
}

int fsync(int fd) {
    static sync_fn real;
    if (!real) real = (sync_fn)dlsym(RTLD_NEXT, "fsync");
    if (flush_file(fd)) return -1;
    return real(fd);
}
