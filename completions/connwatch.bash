# bash completion for connwatch.
# Install: copy to /usr/share/bash-completion/completions/connwatch (or source it from ~/.bashrc).
_connwatch() {
    local cur prev words cword
    _init_completion 2>/dev/null || {
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD-1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    }

    local commands="run check-config demo top probe"
    local command="" i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            run | check-config | demo | top | probe) command=${words[i]}; break ;;
        esac
    done

    case $prev in
        -c | --config)
            COMPREPLY=($(compgen -f -- "$cur"))
            return ;;
        --type) COMPREPLY=($(compgen -W "tcp http send-expect heartbeat" -- "$cur")); return ;;
        --sort) COMPREPLY=($(compgen -W "bytes age idle rtt" -- "$cur")); return ;;
        --scheme) COMPREPLY=($(compgen -W "http https" -- "$cur")); return ;;
        --admin) COMPREPLY=($(compgen -W "http://127.0.0.1:9464" -- "$cur")); return ;;
        --listen | --upstream | --duration | --listener | --timeout | --port | --path | --host | \
            --expected-status | --send | --expect)
            return ;;
    esac

    local opts
    case $command in
        "") opts="$commands --version --help" ;;
        run) opts="-c --config --listen --upstream --help" ;;
        check-config) opts="-c --config --help" ;;
        demo) opts="--duration --help" ;;
        top) opts="--admin --sort --listener --once --upstreams --help" ;;
        probe) opts="--type --timeout --port --path --scheme --host --expected-status --send --expect --help" ;;
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -F _connwatch connwatch
