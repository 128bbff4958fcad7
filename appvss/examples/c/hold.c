/*
 * hold.c: a C application that holds vssd freezes with libappvss.
 *
 * It registers as NAME, answers PREPARE with ready (or vetoes with --veto REASON), and on
 * FREEZE "flushes" (here: fflush + a pretend checkpoint), answers held and stops writing until
 * the THAW event, which also comes when max_hold_ms passes or vssd goes away.
 *
 * Build (from the workspace root, after `cargo build -p appvss`):
 *   cc -o hold appvss/examples/c/hold.c -I appvss/include target/debug/libappvss.a \
 *      -lpthread -ldl -lm -lrt
 * or against the shared library:
 *   cc -o hold appvss/examples/c/hold.c -I appvss/include -L target/debug -lappvss
 *   LD_LIBRARY_PATH=target/debug ./hold
 *
 * Run:  ./hold [--name NAME] [--socket PATH] [--veto REASON] [--once]
 *   --once: exit after the first freeze has ended (exit 0 if it completed while held).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "appvss.h"

static int holding = 0;

static int flush_everything(void) {
    /* A real application writes back its buffers here: COMMIT, checkpoint, fsync. */
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    const char *name = "c-example";
    const char *socket = NULL; /* NULL: $APPVSS_SOCKET, else /run/vssd/appvss.sock */
    const char *veto = NULL;
    int once = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--name") == 0 && i + 1 < argc) {
            name = argv[++i];
        } else if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc) {
            socket = argv[++i];
        } else if (strcmp(argv[i], "--veto") == 0 && i + 1 < argc) {
            veto = argv[++i];
        } else if (strcmp(argv[i], "--once") == 0) {
            once = 1;
        } else {
            fprintf(stderr, "usage: %s [--name NAME] [--socket PATH] [--veto REASON] [--once]\n", argv[0]);
            return 2;
        }
    }

    appvss_client *c = appvss_connect(name, socket);
    if (c == NULL) {
        fprintf(stderr, "hold: appvss_connect: %s\n", appvss_last_error());
        return 1;
    }

    int status = 0;
    for (;;) {
        appvss_event ev;
        int r = appvss_next_event(c, -1, &ev);
        if (r < 0) {
            fprintf(stderr, "hold: appvss_next_event: %s\n", appvss_last_error());
            status = 1;
            break;
        }
        if (r == 0) {
            continue;
        }
        switch (ev.kind) {
        case APPVSS_EVENT_KIND_CONNECTED:
            printf("connected app_id=%llu version=%u\n", (unsigned long long)ev.app_id, ev.version);
            break;
        case APPVSS_EVENT_KIND_DISCONNECTED:
            printf("disconnected: %s\n", appvss_last_error());
            break;
        case APPVSS_EVENT_KIND_PREPARE:
            printf("prepare freeze_id=%llu deadline_ms=%llu\n", (unsigned long long)ev.freeze_id,
                   (unsigned long long)ev.deadline_ms);
            if (veto != NULL) {
                appvss_veto(c, ev.freeze_id, veto);
            } else if (appvss_ready(c, ev.freeze_id) != APPVSS_OK) {
                fprintf(stderr, "hold: appvss_ready: %s\n", appvss_last_error());
            }
            break;
        case APPVSS_EVENT_KIND_FREEZE:
            if (flush_everything() != 0) {
                appvss_failed(c, ev.freeze_id, "flush failed");
                break;
            }
            /* From here on: no writes until the THAW event. */
            holding = 1;
            if (appvss_held(c, ev.freeze_id) != APPVSS_OK) {
                fprintf(stderr, "hold: appvss_held: %s\n", appvss_last_error());
                holding = 0;
                break;
            }
            printf("held freeze_id=%llu max_hold_ms=%llu\n", (unsigned long long)ev.freeze_id,
                   (unsigned long long)ev.max_hold_ms);
            fflush(stdout);
            break;
        case APPVSS_EVENT_KIND_THAW:
            holding = 0; /* writing may resume */
            printf("thaw freeze_id=%llu release=%s\n", (unsigned long long)ev.freeze_id,
                   appvss_release_str(ev.release));
            fflush(stdout);
            if (once) {
                status = (ev.release == APPVSS_RELEASE_COMPLETED || veto != NULL) ? 0 : 1;
                goto done;
            }
            break;
        default:
            break;
        }
        fflush(stdout);
    }
done:
    appvss_close(c);
    return status;
}
