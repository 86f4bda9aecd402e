/* From the seed tutorial, "Socket Programming in C" > UDP Echo > client.c */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#define SERVER_ADDRESS "127.0.0.1"
#define SERVER_PORT 50000
#define BUFFER_SIZE 4096
#define MSG "hello world"

int main(int argc, char *argv[])
{
    int ret, client_sock;
    struct sockaddr_in server_addr, recv_addr;
    char buffer[BUFFER_SIZE];
    unsigned int msg_len, recv_addr_size;

    // create a socket
    client_sock = socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP);
    if (client_sock < 0) {
        perror("socekt() failed");
        exit(1);
    }

    // construct a server socket address
    memset(&server_addr, 0, sizeof(server_addr));
    server_addr.sin_family = AF_INET;
    server_addr.sin_addr.s_addr = inet_addr(SERVER_ADDRESS);
    server_addr.sin_port = htons(SERVER_PORT);

    // send a message to the server
    msg_len = strlen(MSG);
    ret = sendto(client_sock, MSG, msg_len, 0,
                 (struct sockaddr *)&server_addr, sizeof(server_addr));
    if (ret != msg_len) {
        perror("sendto() failed");
        exit(1);
    }

    // receive a message from the server
    /* sockd: the seed leaves this uninitialised; recvfrom() needs it */
    recv_addr_size = sizeof(recv_addr);
    ret = recvfrom(client_sock, buffer, BUFFER_SIZE - 1, 0,
                   (struct sockaddr *)&recv_addr, &recv_addr_size);
    if (ret != msg_len) {
        perror("recvfrom() failed");
        exit(1);
    }
    if (server_addr.sin_addr.s_addr != recv_addr.sin_addr.s_addr) {
        fprintf(stderr, "Received a packet from an unknown source.\n");
        exit(1);
    }
    buffer[ret] = '\0';
    printf("%s\n", buffer);

    // close the socket
    close(client_sock);

    return 0;
}
